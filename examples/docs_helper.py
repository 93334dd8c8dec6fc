"""A small app that embeds an edgekit bundle: a command-line helper that answers questions
about a topic, on the device, with no server and no network.

    python examples/docs_helper.py runs/quickstart/export "What does the json module do?"

It loads whatever the bundle holds (the Q4_K_M GGUF on llama.cpp, else the int4 ONNX folder
on ONNX Runtime) through `edgekit.runtime`, streams the reply as it is generated, and prints
the speed it got. Everything it uses is in the bundle's README.
"""

import argparse
import sys
import time

import edgekit.runtime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="runs/<name>/export, a .gguf file or an ONNX folder")
    p.add_argument("question")
    p.add_argument("--max-tokens", type=int, default=96)
    args = p.parse_args(argv)

    model = edgekit.runtime.load(args.bundle)
    messages = [{"role": "system", "content": "You are a concise assistant for Python programmers."},
                {"role": "user", "content": args.question}]
    start, pieces = time.perf_counter(), 0
    for piece in model.chat(messages, max_tokens=args.max_tokens, stream=True):
        print(piece, end="", flush=True)
        pieces += 1
    elapsed = time.perf_counter() - start
    print(f"\n[{model.backend}, {model.path.name}: {pieces} pieces in {elapsed:.2f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
