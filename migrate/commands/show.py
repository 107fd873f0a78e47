"""`kcr-migrate show FILE` (or `-i FILE`): an image as JSON (header, process, files, mappings, threads, page index;
the tree and the other processes of a process tree; whether its signature verified with this
host's key, under "signature" and in one line on stderr). It shows any image, signed or not."""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from migrate.cli import EXIT_USAGE, add_image_input, add_image_key, command, image_input

if TYPE_CHECKING:
    from transport.image import ImageReader


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_image_input(p)
    add_image_key(p)


def image_to_json(reader: "ImageReader") -> dict[str, Any]:
    """The image's records by name. A process tree's root is at the top, as a single process
    is; the tree is under "tree" and every other process's records under "processes" by pid."""
    from transport.pages import PageBatch
    from transport.schema import (PAGE_SIZE, EndOfImage, EventFiles, Files, ImageHeader, InetSockets, Mappings, Pipes,
                                  ParentPages, ProcessBegin, ProcessState, ProcessTree, ThreadState, UnixSockets,
                                  record_to_json)

    out: dict[str, Any] = {"threads": [], "page_index": []}
    current = out
    indexes: list[tuple[dict[str, Any], list[list[Any]]]] = [(out, [])]
    names = {ImageHeader: "header", ProcessState: "process", Files: "files", Pipes: "pipes", UnixSockets: "sockets", EventFiles: "event_files",
             InetSockets: "inet_sockets",
             Mappings: "mappings", EndOfImage: "end", ProcessTree: "tree"}
    for item in reader:
        if isinstance(item, PageBatch):
            index = indexes[-1][1]
            for addr, n in item.runs:
                if index and index[-1][2] + index[-1][1] * PAGE_SIZE == addr:
                    index[-1][1] += n
                else:
                    index.append([hex(addr), n, addr])
        elif isinstance(item, ThreadState):
            current["threads"].append(record_to_json(item))
        elif isinstance(item, ProcessBegin):
            if item.pid != out.get("header", {}).get("pid"):
                current = out.setdefault("processes", {}).setdefault(str(item.pid), {"threads": []})
                indexes.append((current, []))
        elif isinstance(item, EndOfImage):
            out["end"] = record_to_json(item)
        elif isinstance(item, ParentPages):       # pages it holds as its parent's: not in its page index
            current.setdefault("parent_pages", []).extend(
                {"addr": hex(r.start), "pages": (r.end - r.start) // PAGE_SIZE} for r in item.ranges)
        else:
            current[names.get(type(item), type(item).__name__)] = record_to_json(item)
    for where, index in indexes:
        where["page_index"] = [{"addr": a, "pages": n} for a, n, _ in index]
    out["stats"] = {"page_batches": reader.stats.page_batches, "pages": reader.stats.pages,
                    "bytes_raw": reader.stats.bytes_raw}
    signature: dict[str, Any] = reader.verifier.as_dict()
    out["signature"] = signature
    # The key the image's header names: the truth only where the signature verified.
    signature["image_key_id"] = out.get("header", {}).get("key_id") or None
    if not signature["verified"] and signature["image_key_id"] and signature["key_id"] \
            and signature["image_key_id"] != signature["key_id"]:
        signature["message"] += (f" (the image names key id {signature['image_key_id']}, this host's key is "
                                 f"{signature['key_id']})")
    return out


@command("show", "decode an image to JSON, for humans and debugging", add_arguments, teardown=False)
def run(args: argparse.Namespace) -> int:
    from transport.image import ImageReader, open_input
    from transport.signing import ImageVerifier

    path = image_input(args, "show")
    if path is None:
        return EXIT_USAGE
    verifier = ImageVerifier.for_host(args.image_key, trust_image=True)
    with open_input(path) as src:
        data = image_to_json(ImageReader(src, verifier=verifier))
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
    print(f"kcr-migrate: {data['signature']['message']}", file=sys.stderr)
    return 0

