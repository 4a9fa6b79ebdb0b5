"""`morphserve serve` through a real grpcio client: concurrent streams with
mixed KV policies, cancellation and deadlines, malformed and oversized
requests, the Prometheus metrics contract and the drain on SIGTERM.

Each TestCase starts its own server on free ports, so CTest runs them side
by side. Counters are compared as deltas from a scrape taken before the
test's requests (the server's warm-up generation counts too)."""

import concurrent.futures
import random
import threading
import unittest

import grpc

from morphserve.v1 import generation_pb2 as pb
from morphserve_testing import Server, Stream, generate, poll

GENERATE = "/morphserve.v1.Generation/Generate"


def make_request(prompt, max_new_tokens, policy="", window=None, capacity=None, sinks=None,
                 stop_token_ids=(), request_id=""):
    """A greedy request that ignores EOS; `prompt` is text or token ids."""
    r = pb.GenerateRequest(request_id=request_id)
    if isinstance(prompt, str):
        r.text = prompt
    else:
        r.tokens.ids.extend(prompt)
    r.sampling.temperature = 0.0
    r.stopping.max_new_tokens = max_new_tokens
    r.stopping.ignore_eos = True
    r.stopping.stop_token_ids.extend(stop_token_ids)
    r.kv.policy = policy
    for name, value in (("window", window), ("capacity", capacity), ("sinks", sinks)):
        if value is not None:
            setattr(r.kv, name, value)
    return r


def usage_figures(usage):
    """The usage fields that do not depend on timing."""
    return (usage.prompt_tokens, usage.completion_tokens, usage.kv_tokens_resident,
            usage.kv_tokens_full_equivalent, usage.kv_tokens_evicted, usage.kv_bytes_resident,
            usage.kv_bytes_saved)


def delta(after, before, name, /, **labels):
    """How much a sample grew; a series not exported yet counts as 0."""
    key = (name, frozenset(labels.items()))
    return after.samples.get(key, 0.0) - before.samples.get(key, 0.0)


class ConcurrentStreamsTest(unittest.TestCase):
    """Many streams at once, each KV policy among them, give every request the
    tokens it gets alone, with usage that follows the policy's definition."""

    W, C, SNAP_C = 4, 16, 40

    def policy_of(self, i):
        """Policy parameters of request i, cycling through every policy."""
        kind = ("full", "morphkv", "h2o", "streaming", "snapkv")[i % 5]
        if kind == "full":
            return {"policy": "full"}
        if kind == "snapkv":
            return {"policy": "snapkv", "window": self.W, "capacity": self.SNAP_C}
        extra = {"sinks": 2} if kind == "streaming" else {}
        return {"policy": kind, "window": self.W, "capacity": self.C, **extra}

    def requests(self):
        rng = random.Random(7)
        out = []
        for i in range(40):
            kv = self.policy_of(i)
            if i % 8 == 0:
                prompt = f"Request {i}: the quick brown fox jumps over the lazy dog. " * (1 + i % 3)
            elif kv["policy"] == "snapkv":
                # Short prompts keep everything; long ones are cut to C once.
                length = 10 if i % 10 == 4 else 60
                prompt = [rng.randrange(3, 32000) for _ in range(length)]
            else:
                prompt = [rng.randrange(3, 32000) for _ in range(rng.randrange(2, 45))]
            out.append(make_request(prompt, rng.randrange(20, 48), **kv))
        return out

    def check_usage(self, request, stream, prompt_tokens):
        u = stream.last.usage
        what = f"{request.kv.policy} request of {prompt_tokens} prompt tokens"
        self.assertEqual(u.prompt_tokens, prompt_tokens, what)
        self.assertEqual(u.completion_tokens, len(stream.tokens), what)
        # The last token is returned but never written to the cache.
        full = prompt_tokens + len(stream.tokens) - 1
        self.assertEqual(u.kv_tokens_full_equivalent, full, what)
        policy, capacity = request.kv.policy, request.kv.capacity
        if policy == "full":
            resident = full
        elif policy == "snapkv":
            resident = full - max(0, prompt_tokens - capacity)
        else:
            resident = min(full, capacity + 1)
        self.assertEqual(u.kv_tokens_resident, resident, what)
        self.assertEqual(u.kv_tokens_evicted, full - resident, what)
        per_token = u.kv_bytes_resident // u.kv_tokens_resident
        self.assertEqual(u.kv_bytes_resident, resident * per_token, what)
        self.assertEqual(u.kv_bytes_saved, (full - resident) * per_token, what)
        if policy == "full" or (policy == "snapkv" and prompt_tokens <= capacity):
            self.assertEqual(u.kv_bytes_saved, 0, what)
        else:
            self.assertGreater(u.kv_bytes_saved, 0, what)
        return per_token

    def test_streams_match_their_requests_run_alone(self):
        with Server("--kv-cache-blocks", "1024", "--max-num-seqs", "64") as server:
            requests = self.requests()
            alone = [generate(server.stub, r) for r in requests]
            # A stop token id from the middle of some outputs gives STOP
            # finishes among the streams.
            for i in range(1, 40, 5):
                tokens = alone[i].tokens
                firsts = [k for k in range(1, len(tokens) - 1) if tokens[k] not in tokens[:k]]
                k = firsts[len(firsts) // 2]
                stopped = pb.GenerateRequest()
                stopped.CopyFrom(requests[i])
                stopped.stopping.stop_token_ids.append(tokens[k])
                requests.append(stopped)
                alone.append(generate(server.stub, stopped))
                self.assertEqual(alone[-1].tokens, tokens[:k + 1])
            self.assertGreaterEqual(len(requests), 32)

            peak_running = 0
            done = threading.Event()

            def watch_load():
                nonlocal peak_running
                while not done.wait(0.005):
                    peak_running = max(peak_running, server.load().running)

            watcher = threading.Thread(target=watch_load)
            watcher.start()
            start = threading.Barrier(len(requests))

            def run(request):
                start.wait()
                return generate(server.stub, request)

            with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
                together = list(pool.map(run, requests))
            done.set()
            watcher.join()
            self.assertGreater(peak_running, 1, "the streams never ran together")

            per_token = set()
            for i, (request, a, t) in enumerate(zip(requests, alone, together)):
                with self.subTest(request=i, policy=request.kv.policy):
                    self.assertEqual(a.code, grpc.StatusCode.OK, a.details)
                    self.assertEqual(t.code, grpc.StatusCode.OK, t.details)
                    self.assertEqual(t.tokens, a.tokens)
                    self.assertEqual(t.text, a.text)
                    self.assertEqual(usage_figures(t.last.usage), usage_figures(a.last.usage))
                    if request.stopping.stop_token_ids:
                        self.assertEqual(t.last.finish_reason, pb.FINISH_REASON_STOP)
                        self.assertEqual(t.tokens[-1], request.stopping.stop_token_ids[0])
                        self.assertLess(len(t.tokens), request.stopping.max_new_tokens)
                    else:
                        self.assertEqual(t.last.finish_reason, pb.FINISH_REASON_LENGTH)
                        self.assertEqual(len(t.tokens), request.stopping.max_new_tokens)
                    if request.HasField("tokens"):
                        prompt_tokens = len(request.tokens.ids)
                    else:
                        prompt_tokens = len(server.stub.Tokenize(
                            pb.TokenizeRequest(text=request.text, add_special_tokens=True),
                            timeout=10).ids)
                    per_token.add(self.check_usage(request, t, prompt_tokens))
            self.assertEqual(len(per_token), 1, "KV bytes per token differ between requests")
            load = server.wait_idle()
            self.assertEqual(load.kv_blocks_free, load.kv_blocks_total)


class CancellationTest(unittest.TestCase):
    """A client cancel, the Cancel RPC and a passed deadline each stop the
    request and give its KV blocks back."""

    @classmethod
    def setUpClass(cls):
        cls.server = Server("--kv-cache-blocks", "256")

    @classmethod
    def tearDownClass(cls):
        cls.server.close()

    def long_request(self, request_id=""):
        return make_request([1, 450, 6593], 4000, "morphkv", 8, 64, request_id=request_id)

    def assert_blocks_return(self, cancelled_before):
        load = self.server.wait_idle()
        self.assertEqual(load.kv_blocks_free, load.kv_blocks_total)
        self.assertEqual(load.running, 0)

        settled = self.server.metrics_when(
            lambda m: m.get("morphserve_kv_blocks_used") == 0 and m.get(
                "morphserve_requests_finished_total", reason="cancelled") == cancelled_before + 1)
        self.assertIsNotNone(settled, "kv_blocks_used or the cancelled count is off")

    def cancelled(self):
        return self.server.metrics().get("morphserve_requests_finished_total", reason="cancelled")

    def test_client_cancel(self):
        before = self.cancelled()
        call = self.server.stub.Generate(self.long_request(), timeout=60)
        stream = Stream().read(call, stop_after=3)
        self.assertEqual(stream.messages, 3)
        call.cancel()
        stream.read(call)
        self.assertEqual(stream.code, grpc.StatusCode.CANCELLED)
        self.assertLess(len(stream.tokens), 4000)
        self.assert_blocks_return(before)

    def test_cancel_rpc(self):
        before = self.cancelled()
        call = self.server.stub.Generate(self.long_request("named-request"), timeout=60)
        stream = Stream().read(call, stop_after=3)
        self.assertEqual(stream.messages, 3)
        reply = self.server.stub.Cancel(pb.CancelRequest(request_id="named-request"), timeout=10)
        self.assertTrue(reply.found)
        stream.read(call)
        self.assertEqual(stream.code, grpc.StatusCode.OK, stream.details)
        self.assertEqual(stream.last.finish_reason, pb.FINISH_REASON_CANCELLED)
        self.assertEqual(stream.last.request_id, "named-request")
        self.assertEqual(stream.last.usage.completion_tokens, len(stream.tokens))
        self.assertLess(len(stream.tokens), 4000)
        self.assert_blocks_return(before)
        # The id is forgotten once the call is over.
        self.assertTrue(poll(lambda: not self.server.stub.Cancel(
            pb.CancelRequest(request_id="named-request"), timeout=10).found))
        self.assertFalse(self.server.stub.Cancel(
            pb.CancelRequest(request_id="no-such-request"), timeout=10).found)

    def test_deadline_exceeded(self):
        before = self.cancelled()
        stream = generate(self.server.stub, self.long_request(), timeout=0.3)
        self.assertEqual(stream.code, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assert_blocks_return(before)


def varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def length_delimited(field, payload):
    """One length-delimited protobuf field: a string, bytes or a message."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


class BadRequestsTest(unittest.TestCase):
    """Invalid UTF-8 in a string field and an oversized message are refused
    with the right status, and the server goes on serving."""

    def raw_generate(self, server, payload):
        """Sends `payload`, a serialized GenerateRequest, as it is."""
        call = server.channel.unary_stream(
            GENERATE, request_serializer=lambda raw: raw,
            response_deserializer=pb.GenerateResponse.FromString)
        return Stream().read(call(payload, timeout=30))

    def test_invalid_utf8_and_oversized_requests(self):
        with Server("--kv-cache-blocks", "64", "--max-message-bytes", "65536") as server:
            good = make_request("Once upon a time", 8)
            expected = generate(server.stub, good)
            self.assertEqual(expected.code, grpc.StatusCode.OK, expected.details)
            before = server.metrics()

            # Everything but the input, then the input by hand (fields are
            # merged, and repeated ones appended, when a message is parsed).
            rest = make_request([1], 4)
            rest.ClearField("tokens")
            rest = rest.SerializeToString()
            bad = b"\xff\xfe"
            control = rest + length_delimited(1, "Once upon a time".encode())
            self.assertEqual(self.raw_generate(server, control).code, grpc.StatusCode.OK)
            cases = {
                "text": rest + length_delimited(1, bad),
                "stopping.stop[1]": rest + length_delimited(1, b"Hello") + length_delimited(
                    5, length_delimited(3, b"ok") + length_delimited(3, bad)),
                "chat.messages[0].content": rest + length_delimited(3, length_delimited(
                    1, length_delimited(1, b"user") + length_delimited(2, bad))),
            }
            for field, payload in cases.items():
                with self.subTest(field=field):
                    s = self.raw_generate(server, payload)
                    self.assertEqual(s.code, grpc.StatusCode.INVALID_ARGUMENT, s.details)
                    self.assertIn(field, s.details)

            oversized = generate(server.stub, make_request("word " * 40000, 4))
            self.assertEqual(oversized.code, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             oversized.details)

            again = generate(server.stub, good)
            self.assertEqual(again.code, grpc.StatusCode.OK, again.details)
            self.assertEqual(again.tokens, expected.tokens)
            after = server.metrics_when(lambda m: delta(
                m, before, "morphserve_requests_finished_total", reason="length") == 2)
            self.assertIsNotNone(after, "the two good requests were not counted")
            self.assertEqual(delta(after, before, "morphserve_requests_rejected_total",
                                   reason="invalid_argument"), len(cases))
            # gRPC refuses the oversized message before the service sees it.
            self.assertEqual(delta(after, before, "morphserve_requests_rejected_total",
                                   reason="resource_exhausted"), 0)
            self.assertIsNone(server.process.poll())


class MetricsTest(unittest.TestCase):
    """Every family of the metrics contract, with counters that grow by what
    the test did and agree with the usage the streams reported."""

    COUNTERS = ("requests_finished", "requests_rejected", "prompt_tokens",
                "generation_tokens", "preemptions", "engine_steps", "kv_tokens_evicted",
                "request_kv_bytes_saved", "request_kv_bytes_full_equivalent")
    GAUGES = ("requests_running", "requests_waiting", "kv_blocks_total", "kv_blocks_used",
              "kv_blocks_free", "kv_usage_ratio", "kv_tokens_resident",
              "kv_tokens_full_equivalent", "kv_bytes_resident", "kv_bytes_saved",
              "kv_savings_ratio", "build_info", "model_info")
    HISTOGRAMS = ("time_to_first_token_seconds", "inter_token_latency_seconds",
                  "request_latency_seconds", "queue_time_seconds", "batch_size")
    FINISH_REASONS = ("length", "stop", "eos", "cancelled", "failed")
    REJECT_REASONS = ("invalid_argument", "out_of_range", "resource_exhausted",
                      "unauthenticated", "unavailable", "already_exists")

    def test_metrics_follow_the_requests(self):
        with Server("--kv-cache-blocks", "64") as server:
            for path in ("/healthz", "/readyz"):
                self.assertEqual(server.http_get(path)[0], 200, path)
            before = server.metrics()
            for name in self.COUNTERS:
                self.assertEqual(before.types.get("morphserve_" + name), "counter", name)
            for name in self.GAUGES:
                self.assertEqual(before.types.get("morphserve_" + name), "gauge", name)
            for name in self.HISTOGRAMS:
                self.assertEqual(before.types.get("morphserve_" + name), "histogram", name)
            finished = {r["reason"] for r in before.labelled("morphserve_requests_finished_total")}
            self.assertEqual(finished, set(self.FINISH_REASONS))
            rejected = {r["reason"] for r in before.labelled("morphserve_requests_rejected_total")}
            self.assertEqual(rejected, set(self.REJECT_REASONS))
            self.assertEqual(before.get("morphserve_kv_blocks_total"), 64)
            build = before.labelled("morphserve_build_info")
            self.assertEqual(len(build), 1)
            self.assertEqual(set(build[0]), {"version", "commit", "backend"})
            self.assertEqual(before.get("morphserve_build_info", **build[0]), 1)
            model = before.labelled("morphserve_model_info")
            self.assertEqual(len(model), 1)
            self.assertEqual(model[0]["architecture"], "llama")
            self.assertEqual(model[0]["context_length"], "4096")
            self.assertIn("name", model[0])
            self.assertEqual(before.get("morphserve_model_info", **model[0]), 1)

            streams, policies = [], []

            def run(request):
                stream = generate(server.stub, request)
                self.assertEqual(stream.code, grpc.StatusCode.OK, stream.details)
                streams.append(stream)
                policies.append(request.kv.policy or "full")
                return stream

            run(make_request([1, 450, 6593, 2462], 12))
            run(make_request("Once upon a time", 30, "morphkv", 2, 8))
            run(make_request([1, 450, 6593], 25, "h2o", 2, 8))
            run(make_request([1, 450, 6593], 25, "streaming", 2, 8, sinks=1))
            run(make_request(list(range(100, 150)), 10, "snapkv", 4, 40))
            plain = run(make_request([1, 887], 20))
            stopped = run(make_request([1, 887], 20, stop_token_ids=[plain.tokens[10]]))
            self.assertEqual(stopped.last.finish_reason, pb.FINISH_REASON_STOP)

            # A long request, looked at while it runs, then cancelled by id;
            # a second call with its id is refused.
            long_request = make_request([1, 450], 4000, "morphkv", 2, 8, request_id="long")
            call = server.stub.Generate(long_request, timeout=60)
            long_stream = Stream().read(call, stop_after=3)
            duplicate = generate(server.stub, long_request)
            self.assertEqual(duplicate.code, grpc.StatusCode.ALREADY_EXISTS, duplicate.details)
            live = server.metrics_when(lambda m: m.get("morphserve_kv_bytes_saved") > 0)
            self.assertIsNotNone(live, "the live request's savings never showed")
            saved = live.get("morphserve_kv_bytes_saved")
            resident = live.get("morphserve_kv_bytes_resident")
            self.assertAlmostEqual(live.get("morphserve_kv_savings_ratio"),
                                   saved / (saved + resident))
            self.assertEqual(live.get("morphserve_requests_running"), 1)
            used = live.get("morphserve_kv_blocks_used")
            self.assertGreater(used, 0)
            self.assertAlmostEqual(live.get("morphserve_kv_usage_ratio"), used / 64)
            self.assertTrue(server.stub.Cancel(pb.CancelRequest(request_id="long"),
                                               timeout=10).found)
            long_stream.read(call)
            self.assertEqual(long_stream.code, grpc.StatusCode.OK, long_stream.details)
            self.assertEqual(long_stream.last.finish_reason, pb.FINISH_REASON_CANCELLED)
            streams.append(long_stream)
            policies.append("morphkv")

            refused = {
                "invalid_argument": [make_request([1], 4, "lru"),
                                     make_request([1], 4, "morphkv", 8, 4)],
                "out_of_range": [make_request([1, 2, 3], 4095)],
                "resource_exhausted": [make_request([1], 2000)],
            }
            for reason, requests in refused.items():
                for request in requests:
                    s = generate(server.stub, request)
                    self.assertEqual(s.code.name.lower(), reason, s.details)

            reasons = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop",
                       pb.FINISH_REASON_CANCELLED: "cancelled"}
            counts = {reason: 0 for reason in self.FINISH_REASONS}
            for s in streams:
                counts[reasons[s.last.finish_reason]] += 1

            def all_counted(m):
                return m.get("morphserve_kv_blocks_used") == 0 and all(
                    delta(m, before, "morphserve_requests_finished_total", reason=r) == n
                    for r, n in counts.items())

            after = server.metrics_when(all_counted)
            self.assertIsNotNone(after, "finished requests or freed blocks are not counted")
            for reason, n in counts.items():
                self.assertEqual(delta(after, before, "morphserve_requests_finished_total",
                                       reason=reason), n, reason)
            for reason in self.REJECT_REASONS:
                expected = len(refused.get(reason, [])) + (reason == "already_exists")
                self.assertEqual(delta(after, before, "morphserve_requests_rejected_total",
                                       reason=reason), expected, reason)

            usages = [s.last.usage for s in streams]
            self.assertEqual(delta(after, before, "morphserve_prompt_tokens_total"),
                             sum(u.prompt_tokens for u in usages))
            generated = sum(u.completion_tokens for u in usages)
            self.assertEqual(delta(after, before, "morphserve_generation_tokens_total"), generated)
            saved = sum(u.kv_bytes_saved for u in usages)
            full = sum(u.kv_bytes_resident + u.kv_bytes_saved for u in usages)
            self.assertGreater(saved, 0)
            self.assertEqual(delta(after, before, "morphserve_request_kv_bytes_saved_total"), saved)
            self.assertEqual(
                delta(after, before, "morphserve_request_kv_bytes_full_equivalent_total"), full)
            for policy in set(policies):
                evicted = sum(u.kv_tokens_evicted for u, p in zip(usages, policies) if p == policy)
                self.assertEqual(delta(after, before, "morphserve_kv_tokens_evicted_total",
                                       policy=policy), evicted, policy)
            self.assertEqual(delta(after, before, "morphserve_preemptions_total"), 0)

            steps = delta(after, before, "morphserve_engine_steps_total")
            self.assertGreater(steps, 0)
            self.assertEqual(delta(after, before, "morphserve_batch_size_count"), steps)
            # Each step's sequences make at most one token each.
            self.assertGreaterEqual(delta(after, before, "morphserve_batch_size_sum"), generated)
            for name in ("time_to_first_token_seconds", "request_latency_seconds",
                         "queue_time_seconds"):
                self.assertEqual(delta(after, before, f"morphserve_{name}_count"), len(streams),
                                 name)
            # One gap between each two consecutive tokens of a request.
            self.assertEqual(delta(after, before, "morphserve_inter_token_latency_seconds_count"),
                             sum(u.completion_tokens - 1 for u in usages))

            for name in ("requests_running", "requests_waiting", "kv_blocks_used",
                         "kv_usage_ratio", "kv_tokens_resident", "kv_tokens_full_equivalent",
                         "kv_bytes_resident", "kv_bytes_saved"):
                self.assertEqual(after.get("morphserve_" + name), 0, name)
            self.assertEqual(after.get("morphserve_kv_blocks_free"), 64)
            self.assertEqual(server.http_get("/nope")[0], 404)


class DrainTest(unittest.TestCase):
    """SIGTERM lets every stream in flight finish, refuses new calls with
    UNAVAILABLE, turns /readyz to 503, and the process exits 0."""

    def test_sigterm_drains_streams_in_flight(self):
        with Server("--kv-cache-blocks", "1024", "--drain-timeout", "60") as server:
            self.assertEqual(server.http_get("/readyz")[0], 200)
            requests = [make_request([1, 450], 2000, "full"),
                        make_request([1, 451], 2000, "morphkv")]
            calls = [server.stub.Generate(r, timeout=120) for r in requests]
            streams = []
            for call in calls:
                stream = Stream().read(call, stop_after=1)
                self.assertEqual(stream.messages, 1)
                streams.append(stream)
            readers = [threading.Thread(target=s.read, args=(c,)) for s, c in zip(streams, calls)]
            for reader in readers:
                reader.start()
            before = server.metrics()

            exit_code = []
            terminate = threading.Thread(target=lambda: exit_code.append(server.terminate()))
            terminate.start()
            self.assertTrue(poll(lambda: server.http_get("/readyz")[0] == 503, timeout=5),
                            "/readyz did not turn 503")
            self.assertEqual(server.http_get("/healthz")[0], 200)
            # /readyz may turn a moment before Generate starts refusing.
            self.assertTrue(poll(lambda: generate(server.stub, make_request([1], 4)).code ==
                                 grpc.StatusCode.UNAVAILABLE, timeout=5),
                            "new calls are not refused")
            self.assertTrue(any(reader.is_alive() for reader in readers),
                            "every stream ended before the drain was seen")
            self.assertIsNotNone(server.metrics_when(lambda m: delta(
                m, before, "morphserve_requests_rejected_total", reason="unavailable") == 1),
                "the refused call is not counted")

            for reader in readers:
                reader.join()
            for request, stream in zip(requests, streams):
                with self.subTest(policy=request.kv.policy):
                    self.assertEqual(stream.code, grpc.StatusCode.OK, stream.details)
                    self.assertEqual(len(stream.tokens), 2000)
                    self.assertEqual(stream.last.finish_reason, pb.FINISH_REASON_LENGTH)
                    self.assertEqual(stream.last.usage.completion_tokens, 2000)
            terminate.join()
            self.assertEqual(exit_code, [0])


if __name__ == "__main__":
    unittest.main()
