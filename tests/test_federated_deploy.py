"""Deployment with real Flower processes on loopback: one SuperLink, two SuperNodes, TLS with certificates made here;
a client killed mid-run, then the server killed and resumed. Every wait is bounded."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from finetune.errors import WenmaiError

ROOT = Path(__file__).resolve().parent.parent
MUSEUMS = ROOT / "recipes" / "data" / "museums"


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for 127.0.0.1 / localhost signed by it (cryptography)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def write_key(key, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return path

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wenmai test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder / "ca.crt", folder / "server.crt", write_key(key, folder / "server.key")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "TMPDIR": str(log.parent)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "finetune.cli", *map(str, args)], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and every descendant (a machine that dies: nothing gets to clean up)."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout.split()
    children: dict[int, list[int]] = {}
    for pid, ppid in zip(table[::2], table[1::2], strict=True):
        children.setdefault(int(ppid), []).append(int(pid))
    found, queue = [], [process.pid]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue += children.get(pid, [])
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(30)


def wait_until(condition, timeout_s: float, what: str, processes=()) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        for process in processes:
            if process.poll() is not None and process.returncode != 0:
                raise AssertionError(f"{what}: a process exited with {process.returncode}")
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def rounds_done(run: Path) -> list[dict]:
    path = run / "sft" / "federated.json"
    try:
        return json.loads(path.read_text())["rounds"]
    except (OSError, ValueError):
        return []


def test_non_loopback_without_tls_is_refused():
    from finetune.federated.deploy import Tls

    with pytest.raises(WenmaiError) as err:
        Tls().check("10.1.2.3", server=False)
    assert "only over TLS" in str(err.value) and "--root-certificates" in str(err.value)
    Tls().check("127.0.0.1", server=True)  # loopback may run without


def test_deployment_over_tls_survives_a_killed_client_and_resumes_a_killed_server(tiny_model, tmp_path):
    ca, cert, key = make_certificates(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: fed
        model: {{path: {tiny_model}}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        data:
          palace: {{path: {MUSEUMS}/palace_museum.jsonl, format: chat, max_records: 24, defaults: {{licence: CC0-1.0}}}}
          poetry: {{path: {MUSEUMS}/poetry_museum.jsonl, format: chat, max_records: 24, defaults: {{licence: CC0-1.0}}}}
        stages:
          - sft: {{dataset: palace, max_steps: 2, batch_size: 4, seq_len: 64, learning_rate: 1.0e-2, warmup: 0}}
        output: {{root: {tmp_path / "runs"}}}
        federated:
          rounds: 3
          min_clients: 1
          connect_timeout_s: 120
          round_timeout_s: 240
          clients: [{{name: palace, dataset: palace}}, {{name: poetry, dataset: poetry}}]
        """),
        encoding="utf-8",
    )
    # the server's own recipe names its clients and no data at all: no `data`, no dataset in the stage or clients
    server_recipe = tmp_path / "server.yaml"
    text = recipe.read_text(encoding="utf-8")
    text = text[: text.index("data:")] + text[text.index("stages:") :]
    text = text.replace("dataset: palace, max_steps", "max_steps").replace(", dataset: palace}", "}")
    server_recipe.write_text(text.replace(", dataset: poetry}", "}"), encoding="utf-8")
    assert "dataset" not in server_recipe.read_text(encoding="utf-8")
    run, port = tmp_path / "run", free_port()
    tls = ["--root-certificates", ca, "--certificate", cert, "--key", key]
    server = start(
        ["federate", "server", server_recipe, "--port", port, "--run-dir", run, *tls], tmp_path / "server.log"
    )
    clients = {
        name: start(
            [
                "federate",
                "client",
                recipe,
                "--name",
                name,
                "--superlink",
                f"127.0.0.1:{port}",
                "--root-certificates",
                ca,
                "--folder",
                tmp_path / name,
                "--port",
                free_port(),
            ],
            tmp_path / f"{name}.log",
        )
        for name in ("palace", "poetry")
    }
    try:
        wait_until(lambda: len(rounds_done(run)) >= 1, 400, "round 1", [server, *clients.values()])
        assert set(rounds_done(run)[0]["clients"]) == {"palace", "poetry"}  # both over TLS
        kill_tree(clients["poetry"])  # a client's machine dies during round 2
        wait_until(lambda: len(rounds_done(run)) >= 2, 400, "round 2 without poetry", [server])
        assert set(rounds_done(run)[1]["clients"]) == {"palace"}
        assert rounds_done(run)[1]["failures"]  # the lost client is named in the round's record
        kill_tree(server)  # the server dies during round 3
        assert json.loads((run / "sft" / "status.json").read_text())["state"] == "running"
        kill_tree(clients["palace"])
        done = len(rounds_done(run))
        assert (run / "sft" / "rounds" / f"round-{done:04d}" / "adapter" / "adapter_model.safetensors").is_file()

        port = free_port()
        server = start(["federate", "server", "--resume", run, "--port", port, *tls], tmp_path / "server2.log")
        clients["palace"] = start(
            [
                "federate",
                "client",
                recipe,
                "--name",
                "palace",
                "--superlink",
                f"127.0.0.1:{port}",
                "--root-certificates",
                ca,
                "--folder",
                tmp_path / "palace",
                "--port",
                free_port(),
            ],
            tmp_path / "palace2.log",
        )
        server.wait(600)
        assert server.returncode == 0, (tmp_path / "server2.log").read_text()[-3000:]
    finally:
        for process in [server, *clients.values()]:
            if process.poll() is None:
                kill_tree(process)
    rounds = rounds_done(run)
    assert [r["round"] for r in rounds] == [1, 2, 3]  # continued from the last saved round, none repeated
    status = json.loads((run / "sft" / "status.json").read_text())
    assert status["state"] == "done" and status["attempts"] == 2
    assert (run / "sft" / "rounds" / "round-0003" / "adapter" / "adapter_model.safetensors").is_file()
