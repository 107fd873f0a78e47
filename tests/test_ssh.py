"""The ssh channel against real sshds in the test hosts, and tcp data channels between hosts."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

from examples.testbed import Testbed
from tests._transport import page_batch
from transport.errors import IncompatibleImage, ProtocolError, TransportError, TransportTimeout
from transport.protocol import PROTOCOL_VERSION
from transport.ssh import AsyncioThread, _connect, cpu_has_aes, open_ssh_agent, run_ssh_command
from transport.tcp import new_key


def netns(testbed: Testbed, host: str) -> int:
    return os.stat(testbed.netns_path(host)).st_ino


@pytest.mark.parametrize("level", [None, 1])
async def test_the_agent_runs_inside_each_host(testbed: Testbed, level: int | None) -> None:
    ours = os.stat("/proc/self/ns/net").st_ino
    batches = [page_batch(512, seed=i) for i in range(8)]
    for host in testbed.hosts:
        async with open_ssh_agent(host, ssh_config=str(testbed.ssh_config_path), level=level) as rpc:
            info = await rpc.call("info")
            assert info["netns_inode"] == rpc.remote.netns_inode == netns(testbed, host) != ours
            assert info["mntns_inode"] == os.stat(testbed.mntns_path(host)).st_ino
            async with rpc.open_call("sink", upload=True) as call:
                for b in batches:
                    await call.send_batch(b)
                assert (await call.result())["bytes_raw"] == sum(len(b.data) for b in batches)
            got = 0
            async with rpc.open_call("source_synthetic", total_bytes=8 << 20, level=level) as call:
                async for batch in call.pages:
                    got += len(batch.data)
                await call.result()
            assert got == 8 << 20


async def test_ssh_from_one_test_host_to_the_other(testbed: Testbed) -> None:
    config = str(testbed.ssh_config_path)
    async with open_ssh_agent("hostA", ssh_config=config) as a:
        result = await a.call("source_synthetic", total_bytes=16 << 20, level="auto",
                              to={"kind": "ssh", "host": "hostB", "ssh_config": config})
    assert a.remote.netns_inode == netns(testbed, "hostA")
    assert result["sink"]["netns_inode"] == netns(testbed, "hostB")
    assert result["sink"]["bytes_raw"] == 16 << 20


async def test_tcp_data_channel_between_test_hosts(testbed: Testbed) -> None:
    config = str(testbed.ssh_config_path)
    key = new_key()
    async with open_ssh_agent("hostB", ssh_config=config) as b, open_ssh_agent("hostA", ssh_config=config) as a:
        listening = await b.call("data_listen", key=key, address=testbed.address("hostB"))
        target = {"kind": "tcp", "address": testbed.address("hostB"), "port": listening["port"], "key": key}
        result = await a.call("source_synthetic", total_bytes=16 << 20, level=1, to=target)
        assert result["sink"]["netns_inode"] == netns(testbed, "hostB")
        assert result["sink"]["bytes_raw"] == 16 << 20
        with pytest.raises(ProtocolError, match="key"):
            await a.call("source_synthetic", total_bytes=1 << 20, to=target | {"key": new_key()})


async def test_a_missing_agent_says_how_to_install_it(testbed: Testbed) -> None:
    with pytest.raises(TransportError, match=r"kcr-agent-missing is not installed on hostA.*pip install kcr-migrate"):
        async with open_ssh_agent("hostA", ssh_config=str(testbed.ssh_config_path),
                                  command="kcr-agent-missing serve --stdio"):
            pass


FUTURE_AGENT = """
import dataclasses, os, sys
from transport.framing import KIND_RECORD, STREAM_MAGIC, encode_frame
from transport.protocol import ROLE_AGENT, local_hello
hello = dataclasses.replace(local_hello(ROLE_AGENT), protocol_version=99, tool_version="9.0.0")
os.write(1, STREAM_MAGIC + encode_frame(KIND_RECORD, 0, hello.pack()))
sys.stdin.buffer.read()
"""


async def test_an_agent_of_another_protocol_version_is_refused_naming_both(testbed: Testbed) -> None:
    command = shlex.join([sys.executable, "-c", FUTURE_AGENT])
    with pytest.raises(IncompatibleImage) as info:
        async with open_ssh_agent("hostA", ssh_config=str(testbed.ssh_config_path), command=command):
            pass
    msg = str(info.value)
    assert "on hostA" in msg and "version 99" in msg and f"version {PROTOCOL_VERSION}" in msg
    assert "pip install kcr-migrate" in msg


async def test_a_shell_that_prints_to_stdout(testbed: Testbed) -> None:
    with pytest.raises(ProtocolError, match="login shell prints nothing to stdout"):
        async with open_ssh_agent("hostA", ssh_config=str(testbed.ssh_config_path),
                                  command="echo welcome; kcr-agent serve --stdio"):
            pass


async def test_an_unknown_host_key_is_refused(testbed: Testbed, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    config = tmp_path / "ssh_config"
    config.write_text(testbed.ssh_config_path.read_text().replace(str(testbed.known_hosts_path), str(empty)))
    with pytest.raises(TransportError, match="host key is not in known_hosts"):
        async with open_ssh_agent("hostA", ssh_config=str(config)):
            pass


async def test_an_unknown_host(testbed: Testbed) -> None:
    with pytest.raises(TransportError, match="cannot reach no-such-host.invalid"):
        async with open_ssh_agent("no-such-host.invalid", ssh_config=str(testbed.ssh_config_path),
                                  connect_timeout=10):
            pass


@pytest.mark.skipif(not cpu_has_aes(), reason="this CPU has no AES instructions: asyncssh's own order is kept")
@pytest.mark.parametrize("ciphers, expected", [(None, "aes128-gcm@openssh.com"),
                                               ("chacha20-poly1305@openssh.com", "chacha20-poly1305@openssh.com")])
async def test_aes_gcm_comes_first_unless_the_ssh_config_names_ciphers(
        testbed: Testbed, tmp_path: Path, ciphers: str | None, expected: str) -> None:
    config = testbed.ssh_config_path
    if ciphers is not None:
        config = tmp_path / "ssh_config"
        config.write_text(f"Host *\n    Ciphers {ciphers}\n\n" + testbed.ssh_config_path.read_text())
    aio = AsyncioThread()
    aio.start()
    try:
        conn = await aio.run(_connect("hostA", str(config), 30.0))
        try:
            assert conn.get_extra_info("send_cipher") == conn.get_extra_info("recv_cipher") == expected
        finally:
            conn.close()
            await aio.run(conn.wait_closed())
    finally:
        await aio.stop()


async def test_one_command_runs_inside_the_host_with_its_status_and_output(testbed: Testbed) -> None:
    config = str(testbed.ssh_config_path)
    result = await run_ssh_command("hostB", "readlink /proc/self/ns/net; echo oops >&2; exit 3", ssh_config=config)
    assert result.status == 3
    assert result.stdout.decode().strip() == f"net:[{netns(testbed, 'hostB')}]"
    assert result.stderr == b"oops\n"


async def test_one_command_is_bounded_in_output_and_time(testbed: Testbed) -> None:
    config = str(testbed.ssh_config_path)
    with pytest.raises(ProtocolError, match="wrote more than 1000 bytes"):
        await run_ssh_command("hostA", "head -c 5000 /dev/zero", ssh_config=config, max_output=1000)
    with pytest.raises(TransportTimeout, match="`sleep 5` on hostA did not finish in 0.5 s"):
        await run_ssh_command("hostA", "sleep 5", ssh_config=config, timeout=0.5)
    with pytest.raises(TransportError, match="cannot reach nosuchhost.invalid over SSH"):
        await run_ssh_command("nosuchhost.invalid", "true", ssh_config=config)
