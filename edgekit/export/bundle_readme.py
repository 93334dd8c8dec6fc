"""The README that ships inside runs/<name>/export/: how an app loads the files."""

from __future__ import annotations


def bundle_readme(name: str, files: dict[str, str], ptq: dict[str, str] | None = None, pair: dict | None = None) -> str:
    """`files`: {format: file} of the export stage; `ptq`: {artifact: file} of a quantize stage;
    `pair`: {"target", "draft"} when the student is a draft for speculative decoding."""
    gguf = next((f for k, f in files.items() if k == "q4_k_m"), None) or next((f for f in files.values() if f.endswith(".gguf")), None)
    onnx = files.get("onnx_int4")
    lines = [f"# {name}: exported model bundle", "",
             "Made by `edgekit run`. Files:", ""]
    lines += [f"- `{f}`" + (" (folder)" if k == "onnx_int4" else "") for k, f in files.items()]
    lines += ["", "Quality and speed of each file, and how it was made: `../report.md` and `../manifest.json`.",
              "The GGUF files carry their tokenizer and chat template; the ONNX folder carries",
              "`genai_config.json` and the tokenizer files, so each runs as is.", ""]
    if gguf:
        lines += ["## llama.cpp", "",
                  "Command line (llama.cpp's own tools):", "", "```sh", f"llama-cli -m {gguf} -cnv", "```", "",
                  "Python (llama-cpp-python):", "", "```python", "from llama_cpp import Llama",
                  f'llm = Llama("{gguf}", n_ctx=2048)',
                  'print(llm.create_chat_completion(messages=[{"role": "user", "content": "Hi!"}])["choices"][0]["message"]["content"])',
                  "```", "",
                  "Intel CPUs with AMX (Xeon Sapphire Rapids and later): llama-cpp-python 0.3.36's AMX matmul",
                  "crashes there (llama.cpp issue 20824); `edgekit.runtime` below loads the file with llama.cpp's",
                  "extra weight buffers off on such CPUs, which avoids it.", "",
                  "C/C++: link llama.cpp and load the file with `llama_model_load_from_file`, then",
                  "tokenize, `llama_decode` and sample as in llama.cpp's `examples/simple`.",
                  "Android and iOS: llama.cpp's own Android (`examples/llama.android`) and SwiftUI",
                  "(`examples/llama.swiftui`) examples load a GGUF the same way; ship this file in the app's assets.", ""]
    if pair:
        t, d = pair["target"], pair["draft"]
        lines += ["## Speculative decoding: the target and its draft", "",
                  f"`{d}` is a draft for `{t}`: it shares its tokenizer and was distilled on the target's own answers.",
                  "It proposes a few tokens, the target checks them in one batched pass: greedy output is the target's",
                  "own, token for token, faster when the draft guesses right (`draft.json` names the pair).", "",
                  "```sh", f"llama-server -m {t} -md {d} --draft-max 4     # OpenAI-compatible server",
                  f"llama-speculative -m {t} -md {d} -p 'Hello' -n 128 --temp 0   # prints the acceptance rate",
                  "```", "", "```python", "import edgekit.runtime",
                  "m = edgekit.runtime.load('.')   # reads draft.json: the target with its draft",
                  "```", "", "`edgekit serve .` serves the pair the same way.", ""]
    if onnx:
        lines += ["## ONNX Runtime (onnxruntime-genai)", "", "```python", "import onnxruntime_genai as og",
                  f'model = og.Model("{onnx}")', "tokenizer = og.Tokenizer(model)",
                  "params = og.GeneratorParams(model)", "params.set_search_options(max_length=256)",
                  "gen = og.Generator(model, params)", 'gen.append_tokens(tokenizer.encode("The capital of France is"))',
                  "while not gen.is_done():", "    gen.generate_next_token()",
                  "    print(tokenizer.decode(gen.get_next_tokens()), end='', flush=True)", "```", "",
                  "onnxruntime-genai also has C, C#, Java (Android) and Objective-C (iOS) APIs over the same folder.",
                  "Where the folder has `edgekit_weights.json`, its MatMulNBits weights are the grid QAT trained on",
                  "(int4 where that grid is Q4_0, int8 where it is Q5_0/Q6_K/Q8_0 or Q4_K): the file lists each node.", ""]
    if ptq:
        checkpoints = [f for k, f in ptq.items() if "_gguf_" not in k]
        lines += ["## GPTQ / AWQ (post-training quantization)", "",
                  *[f"- `{f}`" + (" (folder)" if f in checkpoints else "") for f in ptq.values()], "",
                  "The folders are int4 checkpoints in the compressed-tensors format (llm-compressor): plain",
                  "transformers (`AutoModelForCausalLM.from_pretrained(folder)`, with `compressed-tensors`",
                  "installed) and vLLM load them. The GGUF files are GPTQ run on llama.cpp's own grid, or AWQ-smoothed",
                  "weights: they load like any GGUF above.", ""]
    lines += ["## edgekit", "", "```python", "import edgekit.runtime",
              'm = edgekit.runtime.load(".")  # picks the Q4_K_M GGUF; or name a file or the ONNX folder',
              'for piece in m.chat([{"role": "user", "content": "Hi!"}], stream=True):', '    print(piece, end="")',
              "```", "", "Terminal: `edgekit chat .`", "",
              "## Any OpenAI client (local HTTP)", "",
              "`edgekit serve . --port 8080` serves the same model on this machine (127.0.0.1) with the OpenAI",
              "chat-completions protocol (streaming included); point an app's OpenAI client at it:", "",
              "```python", "from openai import OpenAI",
              'client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")',
              f'reply = client.chat.completions.create(model="{gguf or onnx}", messages=[{{"role": "user", "content": "Hi!"}}])',
              "print(reply.choices[0].message.content)", "```", ""]
    return "\n".join(lines)
