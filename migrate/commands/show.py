"""`kcr-migrate show FILE`: an image as JSON (header, process, files, mappings, threads, page index)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from migrate.cli import command

if TYPE_CHECKING:
    from transport.image import ImageReader


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="FILE", help="image file, or - for stdin")


def image_to_json(reader: "ImageReader") -> dict[str, Any]:
    from transport.pages import PageBatch
    from transport.schema import (PAGE_SIZE, EndOfImage, Files, ImageHeader, Mappings, Pipes, ProcessState,
                                  ThreadState, UnixSockets, record_to_json)

    out: dict[str, Any] = {"threads": [], "page_index": []}
    index: list[list[Any]] = out["page_index"]
    names = {ImageHeader: "header", ProcessState: "process", Files: "files", Pipes: "pipes", UnixSockets: "sockets",
             Mappings: "mappings", EndOfImage: "end"}
    for item in reader:
        if isinstance(item, PageBatch):
            for addr, n in item.runs:
                if index and index[-1][2] + index[-1][1] * PAGE_SIZE == addr:
                    index[-1][1] += n
                else:
                    index.append([hex(addr), n, addr])
        elif isinstance(item, ThreadState):
            out["threads"].append(record_to_json(item))
        else:
            out[names.get(type(item), type(item).__name__)] = record_to_json(item)
    out["page_index"] = [{"addr": a, "pages": n} for a, n, _ in index]
    out["stats"] = {"page_batches": reader.stats.page_batches, "pages": reader.stats.pages,
                    "bytes_raw": reader.stats.bytes_raw}
    return out


@command("show", "decode an image to JSON, for humans and debugging", add_arguments)
def run(args: argparse.Namespace) -> int:
    from transport.image import ImageReader, open_input

    with open_input(args.image) as src:
        data = image_to_json(ImageReader(src))
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0

