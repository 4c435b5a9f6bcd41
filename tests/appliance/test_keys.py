"""``armdi keys init``, the TLS settings in cluster.toml, and mutual TLS on real sockets."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli import app
from appliance.config import ConfigError, parse_config
from appliance.keys import KeysError, init_keys
from appliance.wire.transport import DataInbox, DataOutbox, TlsFiles, TransportTimeout


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_keys_init_writes_a_ca_and_node_certificates_with_private_keys_0600(
        tmp_path: Path) -> None:
    from cryptography import x509

    keys = init_keys(tmp_path / "keys", ["source", "w1"], {"w1": ["10.0.0.7", "jetson-1"]})
    assert _mode(keys.out) == 0o700
    for secret in (keys.key_file, keys.ca_key, *keys.node_pems.values()):
        assert _mode(secret) == 0o600, secret
    assert _mode(keys.ca_cert) == 0o644
    assert len(bytes.fromhex(keys.key_file.read_text().strip())) == 32
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(keys.node_pems["w1"].read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"armdi-node", "w1", "localhost", "jetson-1"} <= set(
        names.get_values_for_type(x509.DNSName))
    assert "BEGIN PRIVATE KEY" in keys.node_pems["w1"].read_text()  # key and cert, one file
    with pytest.raises(KeysError, match="exists"):
        init_keys(tmp_path / "keys", ["source"])  # never overwrites keys


def test_keys_init_command_takes_the_names_and_hosts_of_a_config(tmp_path: Path) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text('[cluster]\nmodel = "m"\n[source]\ndata_addr = "tcp://10.0.0.1:5000"\n'
                      'control_addr = "tcp://10.0.0.1:5001"\n[[workers]]\nname = "w1"\n'
                      'data_addr = "tcp://10.0.0.2:5000"\ncontrol_addr = "tcp://10.0.0.2:5001"\n')
    result = CliRunner().invoke(app, ["keys", "init", "--out", str(tmp_path / "k"),
                                      "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k" / "nodes" / "w1.pem").exists()
    assert "tls_ca =" in result.output and "tls_cert =" in result.output


def _tls_config(tmp_path: Path, **worker: object) -> dict[str, object]:
    keys = init_keys(tmp_path / "keys", ["source", "w1"])
    return {
        "cluster": {"model": "m", "key_file": str(keys.key_file), "tls_ca": str(keys.ca_cert)},
        "source": {"data_addr": "tls+tcp://127.0.0.1:5000",
                   "control_addr": "tls+tcp://127.0.0.1:5001",
                   "tls_cert": str(keys.node_pems["source"])},
        "workers": [{"name": "w1", "data_addr": "tls+tcp://127.0.0.1:5002",
                     "control_addr": "tls+tcp://127.0.0.1:5003",
                     "tls_cert": str(keys.node_pems["w1"]), **worker}],
    }


def test_tls_addresses_need_the_ca_and_each_node_its_certificate(tmp_path: Path) -> None:
    data = _tls_config(tmp_path)
    config = parse_config(data)
    files = config.tls_files("w1")
    assert files is not None and files.cert_key.name == "w1.pem"
    missing_ca = {**data, "cluster": {"model": "m"}}
    with pytest.raises(ConfigError, match=r"cluster\.tls_ca"):
        parse_config(missing_ca)
    no_cert = {**data, "workers": [{k: v for k, v in data["workers"][0].items()  # type: ignore
                                    if k != "tls_cert"}]}
    with pytest.raises(ConfigError, match=r"workers\[0\].tls_cert"):
        parse_config(no_cert)
    mixed = {**data, "workers": [{**data["workers"][0],  # type: ignore[index]
                                  "data_addr": "tcp://127.0.0.1:5002",
                                  "control_addr": "tcp://127.0.0.1:5003"}]}
    with pytest.raises(ConfigError, match="every node must use tls"):
        parse_config(mixed)


def test_mutual_tls_delivers_between_members_and_refuses_others(tmp_path: Path) -> None:
    ours = init_keys(tmp_path / "ours", ["source", "w1"])
    theirs = init_keys(tmp_path / "theirs", ["source", "w1"])
    server = TlsFiles(ours.ca_cert, ours.node_pems["w1"])
    with DataInbox("tls+tcp://127.0.0.1:0", max_bytes=1 << 20, tls=server) as inbox:
        with DataOutbox(inbox.address, tls=TlsFiles(ours.ca_cert,
                                                    ours.node_pems["source"])) as member:
            member.send(b"from a member", timeout_ms=5000)
            assert bytes(inbox.recv(timeout_ms=5000)) == b"from a member"
        strangers = [
            DataOutbox(inbox.address, tls=TlsFiles(theirs.ca_cert, theirs.node_pems["source"])),
            # a certificate of another CA, though it trusts ours
            DataOutbox(inbox.address, tls=TlsFiles(ours.ca_cert, theirs.node_pems["source"])),
            DataOutbox(inbox.address.replace("tls+tcp://", "tcp://")),  # no TLS at all
        ]
        for outbox in strangers:
            with outbox, pytest.raises(TransportTimeout):
                outbox.send(b"injected", timeout_ms=700)
        with pytest.raises(TransportTimeout):
            inbox.recv(timeout_ms=300)  # nothing of theirs arrived


def test_a_secret_readable_by_others_is_named_with_the_fix(tmp_path: Path) -> None:
    from appliance.keys import check_private_file

    secret = tmp_path / "cluster.key"
    secret.write_text("ab" * 32)
    secret.chmod(0o644)
    assert f"chmod 600 {secret}" in (check_private_file(secret) or "")
    secret.chmod(0o600)
    assert check_private_file(secret) is None
