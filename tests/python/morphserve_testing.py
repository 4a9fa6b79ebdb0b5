"""Starts the real `morphserve serve` on loopback for the Python tests and
reads its gRPC API and its metrics page.

The binary and the tiny model come from the environment CTest sets
(MORPHSERVE_BINARY, MORPHSERVE_TINY_MODEL); the stubs are on PYTHONPATH.
"""

import http.client
import os
import re
import signal
import subprocess
import threading
import time

import grpc
from prometheus_client.parser import text_string_to_metric_families

from morphserve.v1 import generation_pb2 as pb
from morphserve.v1 import generation_pb2_grpc as pb_grpc

BINARY = os.environ.get("MORPHSERVE_BINARY", "build/bin/morphserve")
TINY_MODEL = os.environ.get(
    "MORPHSERVE_TINY_MODEL", "../shared/fixtures/models/llama-2-tiny-random.gguf")

STARTUP_LINE = re.compile(
    r"^morphserve: serving (?P<model>.+) on (?P<host>.+):(?P<port>\d+) "
    r"\((?P<blocks>\d+) KV blocks of (?P<block_size>\d+) tokens\), metrics on (?P<metrics>-?\d+)$")


def poll(condition, timeout=10.0, interval=0.02):
    """Calls `condition` until it returns something true or `timeout` passes;
    returns its last value. Figures are published once per engine step, so
    tests poll for them instead of sleeping."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class Metrics:
    """One scrape of /metrics: families by name, samples by name and labels."""

    def __init__(self, text):
        self.types = {}
        self.samples = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name, /, **labels):
        key = (name, frozenset(labels.items()))
        if key not in self.samples:
            raise AssertionError(f"/metrics has no {name} {labels}")
        return self.samples[key]

    def labelled(self, name):
        """The label sets of every sample called `name`."""
        return [dict(labels) for n, labels in self.samples if n == name]


class Server:
    """`morphserve serve` on 127.0.0.1 with free ports, the tiny model and one
    engine thread unless `args` says otherwise. Use as a context manager:
    the process is killed on exit unless `terminate` already ended it."""

    def __init__(self, *args):
        self.process = subprocess.Popen(
            [BINARY, "serve", "--model", TINY_MODEL, "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", "0", "--threads", "1", "--log-level", "warn", *args],
            stdout=subprocess.PIPE, text=True)
        self.startup_line = ""
        for line in self.process.stdout:
            match = STARTUP_LINE.match(line.rstrip("\n"))
            if match:
                self.startup_line = line
                break
        if not self.startup_line:
            code = self.process.wait()
            raise RuntimeError(f"morphserve serve exited ({code}) before serving")
        self.port = int(match["port"])
        self.metrics_port = int(match["metrics"])
        self.kv_blocks = int(match["blocks"])
        self.block_size = int(match["block_size"])
        # Keep reading stdout so that the server can never block on a full pipe.
        self.stdout_reader = threading.Thread(target=self.process.stdout.read, daemon=True)
        self.stdout_reader.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.GenerationStub(self.channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Kills the process unless it already ended."""
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stdout_reader.join(timeout=10)
        self.process.stdout.close()

    def terminate(self, timeout=60):
        """SIGTERM, then the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def http_get(self, path):
        """(status, body) of GET `path` on the metrics port."""
        connection = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def metrics(self):
        status, body = self.http_get("/metrics")
        if status != 200:
            raise AssertionError(f"/metrics answered {status}")
        return Metrics(body)

    def metrics_when(self, predicate, timeout=10.0):
        """The first scrape that satisfies `predicate`, or None after
        `timeout`."""
        def scrape():
            m = self.metrics()
            return m if predicate(m) else None

        return poll(scrape, timeout)

    def load(self):
        return self.stub.GetLoad(pb.GetLoadRequest(), timeout=10)

    def wait_idle(self, timeout=10.0):
        """Polls GetLoad until nothing runs or waits and every KV block is
        free; returns the last Load."""
        last = None

        def idle():
            nonlocal last
            last = self.load()
            return last.running == 0 and last.waiting == 0 and \
                last.kv_blocks_free == last.kv_blocks_total

        poll(idle, timeout)
        return last


class Stream:
    """What one Generate call streamed: token ids, text, the last message and
    the final status code (grpc.StatusCode.OK when it ended normally)."""

    def __init__(self):
        self.tokens = []
        self.text = ""
        self.messages = 0
        self.last = None
        self.code = None
        self.details = ""

    def read(self, call, stop_after=None):
        """Reads `call` to its end, or only `stop_after` messages."""
        try:
            for response in call:
                self.tokens.extend(response.token_ids)
                self.text += response.text
                self.messages += 1
                self.last = response
                if stop_after is not None and self.messages >= stop_after:
                    return self
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.code = e.code()
            self.details = e.details() or ""
        return self


def generate(stub, request, timeout=60):
    return Stream().read(stub.Generate(request, timeout=timeout))
