#!/usr/bin/env python3
"""Streams one reply from a morphserve server, printing the text as it
arrives, then the finish reason and the usage.

    chat_client.py "What is the capital of France?"
    chat_client.py --text "Once upon a time" --max-tokens 32
    echo "Tell me a joke" | chat_client.py --kv-policy morphkv --kv-capacity 256

The Python stubs of proto/morphserve/v1/generation.proto must be on
PYTHONPATH (see README.md).
"""

import argparse
import sys

import grpc

from morphserve.v1 import generation_pb2 as pb
from morphserve.v1 import generation_pb2_grpc as pb_grpc


def parse_args():
    p = argparse.ArgumentParser(description="Chat with a morphserve server.")
    p.add_argument("message", nargs="*",
                   help="the user's message (read from stdin when absent)")
    p.add_argument("--text", help="a plain prompt instead of a chat message "
                   "(for models without a chat template)")
    p.add_argument("--system", help="a system message before the user's")
    p.add_argument("--server", default="localhost:50051", help="HOST:PORT of the server")
    p.add_argument("--api-key", help="sent as `authorization: Bearer KEY`")
    p.add_argument("--tls-ca", help="PEM CA certificate: connect over TLS, trusting it")
    p.add_argument("--kv-policy", choices=["full", "morphkv", "h2o", "snapkv", "streaming"],
                   help="KV cache policy (default: the server's)")
    p.add_argument("--kv-window", type=int, help="recent window W of the KV policy")
    p.add_argument("--kv-capacity", type=int, help="KV capacity C of the policy")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    p.add_argument("--temperature", type=float, help="0 is greedy (default: the server's)")
    p.add_argument("--timeout", type=float, default=600, help="seconds the call may take")
    return p.parse_args()


def build_request(args):
    request = pb.GenerateRequest()
    if args.text is not None:
        request.text = args.text
    else:
        if args.system:
            request.chat.messages.add(role="system", content=args.system)
        content = " ".join(args.message) if args.message else sys.stdin.read()
        request.chat.messages.add(role="user", content=content)
    request.stopping.max_new_tokens = args.max_tokens
    if args.temperature is not None:
        request.sampling.temperature = args.temperature
    if args.kv_policy:
        request.kv.policy = args.kv_policy
    if args.kv_window is not None:
        request.kv.window = args.kv_window
    if args.kv_capacity is not None:
        request.kv.capacity = args.kv_capacity
    return request


def connect(args):
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        return grpc.secure_channel(args.server, credentials)
    return grpc.insecure_channel(args.server)


def print_usage(last):
    finish = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    u = last.usage
    full_bytes = u.kv_bytes_resident + u.kv_bytes_saved
    saved = 100.0 * u.kv_bytes_saved / full_bytes if full_bytes else 0.0
    print(f"\n\nfinish: {finish}")
    print(f"tokens: {u.prompt_tokens} prompt, {u.completion_tokens} completion; "
          f"first token after {u.time_to_first_token_seconds:.3f} s")
    print(f"kv cache: {u.kv_tokens_resident} tokens resident of "
          f"{u.kv_tokens_full_equivalent} with a full cache, "
          f"{u.kv_bytes_saved} bytes saved ({saved:.1f}%)")


def main():
    args = parse_args()
    request = build_request(args)
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    with connect(args) as channel:
        stub = pb_grpc.GenerationStub(channel)
        last = None
        try:
            for response in stub.Generate(request, timeout=args.timeout, metadata=metadata):
                print(response.text, end="", flush=True)
                last = response
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print_usage(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
