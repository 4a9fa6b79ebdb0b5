"""Runs examples/python/chat_client.py against the tiny model (which has no
chat template, hence --text): it prints the streamed text, then the usage,
and its KV, API key and TLS flags reach the server."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

from morphserve.v1 import generation_pb2 as pb
from morphserve_testing import Server, generate

CLIENT = pathlib.Path(__file__).resolve().parents[2] / "examples" / "python" / "chat_client.py"
PROMPT = "Once upon a time"


def run_client(*args):
    return subprocess.run([sys.executable, str(CLIENT), "--text", PROMPT, *args],
                          capture_output=True, text=True, timeout=60, check=False)


def make_certificates(directory):
    """A CA and a server certificate for localhost, made with openssl."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=localhost")
    pathlib.Path(directory, "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext")


class ChatClientTest(unittest.TestCase):

    def test_streams_text_then_usage(self):
        with Server("--kv-cache-blocks", "64") as server:
            request = pb.GenerateRequest(text=PROMPT)
            request.stopping.max_new_tokens = 16
            request.sampling.temperature = 0.0
            expected = generate(server.stub, request)
            self.assertTrue(expected.text)
            address = f"127.0.0.1:{server.port}"

            out = run_client("--server", address, "--max-tokens", "16", "--temperature", "0")
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertTrue(out.stdout.startswith(expected.text + "\n\n"), out.stdout)
            finish = pb.FinishReason.Name(expected.last.finish_reason).split("_")[-1].lower()
            self.assertIn(f"\nfinish: {finish}\n", out.stdout)
            u = expected.last.usage
            self.assertIn(f"\ntokens: {u.prompt_tokens} prompt, {u.completion_tokens} completion;",
                          out.stdout)
            self.assertIn(f"\nkv cache: {u.kv_tokens_resident} tokens resident of "
                          f"{u.kv_tokens_full_equivalent} with a full cache, 0 bytes saved",
                          out.stdout)

            out = run_client("--server", address, "--max-tokens", "24", "--temperature", "0",
                             "--kv-policy", "morphkv", "--kv-window", "2", "--kv-capacity", "8")
            self.assertEqual(out.returncode, 0, out.stderr)
            saved = re.search(r"kv cache: 9 tokens resident of (\d+) with a full cache, "
                              r"(\d+) bytes saved", out.stdout)
            self.assertIsNotNone(saved, out.stdout)
            self.assertGreater(int(saved[1]), 9)
            self.assertGreater(int(saved[2]), 0)

            out = run_client("--server", address, "--kv-policy", "morphkv", "--kv-window", "8",
                             "--kv-capacity", "4")
            self.assertEqual(out.returncode, 1)
            self.assertIn("INVALID_ARGUMENT", out.stderr)

    @unittest.skipIf(shutil.which("openssl") is None, "openssl makes the test certificates")
    def test_tls_and_api_key(self):
        with tempfile.TemporaryDirectory() as directory:
            make_certificates(directory)
            keys = os.path.join(directory, "keys.txt")
            pathlib.Path(keys).write_text("secret\n")
            with Server("--kv-cache-blocks", "64", "--api-keys-file", keys, "--tls-cert",
                        os.path.join(directory, "server.pem"), "--tls-key",
                        os.path.join(directory, "server.key")) as server:
                secure = ("--server", f"localhost:{server.port}", "--tls-ca",
                          os.path.join(directory, "ca.pem"), "--max-tokens", "4")
                out = run_client(*secure, "--api-key", "secret")
                self.assertEqual(out.returncode, 0, out.stderr)
                self.assertIn("\ntokens: ", out.stdout)
                out = run_client(*secure, "--api-key", "wrong")
                self.assertEqual(out.returncode, 1)
                self.assertIn("UNAUTHENTICATED", out.stderr)
                out = run_client("--server", f"127.0.0.1:{server.port}", "--api-key", "secret",
                                 "--timeout", "5")
                self.assertEqual(out.returncode, 1, "plain text reached a TLS server")


if __name__ == "__main__":
    unittest.main()
