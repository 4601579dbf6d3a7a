"""rediss:// (TLS) works end to end: broker, result backend, run records."""
import shutil
import subprocess

import pytest

from nasq.queue.redis_server import free_port, redis_binary, wait_for_redis

@pytest.fixture
def tls_redis(tmp_path):
    if not shutil.which("openssl"):
        pytest.fail("openssl is needed to make the test certificate (apt-get install openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen([redis_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                             "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
    if not wait_for_redis(url, proc):
        pytest.fail(f"this redis-server cannot serve TLS: {proc.stdout.read().decode()[-500:] if proc.poll() is not None else 'no answer'}")
    yield url
    proc.terminate()
    proc.wait(10)


def test_eval_over_tls(eval_through, tls_redis):
    report = eval_through(tls_redis)
    assert report.images == 20 and report.top1 == 100.0
