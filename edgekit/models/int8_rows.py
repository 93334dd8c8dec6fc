"""A frozen teacher's token embedding and output head as int8 rows (per-row fp32 scales).

bitsandbytes quantizes the Linear layers inside the blocks; the embedding and head stay fp32,
and with a large vocabulary they are most of a small model (Gemma 3 270M: 640 of 1023 MB).
Used for teachers loaded NF4/int8 (`teacher.load`), which are frozen: nothing here trains.
"""

from __future__ import annotations

import torch

from edgekit.fsutil import release_memory


class Int8Rows:
    """A frozen (V, H) matrix as int8 rows and one fp32 scale per row (absmax / 127): a
    quarter of its fp32 bytes. Quantized in row blocks, so no second fp32 copy is made."""

    BLOCK = 16_384

    def __init__(self, weight):
        v, h = weight.shape
        self.q = torch.empty((v, h), dtype=torch.int8, device=weight.device)
        self.scale = torch.empty(v, dtype=torch.float32, device=weight.device)
        with torch.no_grad():
            for a in range(0, v, self.BLOCK):
                w = weight[a: a + self.BLOCK].float()
                s = w.abs().amax(1).clamp(min=1e-12) / 127
                self.scale[a: a + self.BLOCK] = s
                self.q[a: a + self.BLOCK] = (w / s[:, None]).round_().to(torch.int8)

    def rows(self, ids):
        return self.q[ids].float() * self.scale[ids].unsqueeze(-1)

    def logits(self, x, out=None):
        """x (..., H) @ rows^T, one dequantized block of rows at a time: (..., V), into `out` if given."""
        out = x.new_empty(*x.shape[:-1], self.q.shape[0]) if out is None else out
        for a in range(0, self.q.shape[0], self.BLOCK):
            b = min(a + self.BLOCK, self.q.shape[0])
            out[..., a:b] = x @ (self.q[a:b].float() * self.scale[a:b, None]).T
        return out


def int8_embeddings(model) -> None:
    """Replace a frozen model's token embedding and output head (fp32 beside bitsandbytes'
    NF4/int8 blocks, and most of a small model with a large vocabulary: 640 of Gemma 3 270M's
    1023 MB) by int8 rows with per-row scales, shared when the two are tied. Forward semantics
    are kept: the embedding's scale factor (Gemma's sqrt(H)) and a bias-free head."""

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, torch.nn.Embedding) or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return  # an unusual layout keeps its fp32 embeddings
    rows = Int8Rows(emb.weight)
    head_rows = rows if head.weight is emb.weight else Int8Rows(head.weight)
    model.set_input_embeddings(_Int8Embedding(rows, getattr(emb, "embed_scale", None)))
    model.set_output_embeddings(_Int8Head(head_rows))
    model.config.tie_word_embeddings = False  # nothing to re-tie: the int8 rows are shared already


def own_memory(model) -> None:
    """Copy the tensors a load left as views of the memory-mapped safetensors file (norms,
    biases) into the process's own memory, so the mapping closes. While one view lives, every
    page of the file read to quantize the blocks stays resident: an NF4 SmolLM2-135M teacher
    measured 771 MB RSS above the runtime with 78 MB of tensors, 510 MB of it the mapped file."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype.is_floating_point:
                t.data = t.data.clone()
    release_memory()


class _Int8Module(torch.nn.Module):
    def __init__(self, rows: Int8Rows):
        super().__init__()
        self.rows = rows
        self.register_buffer("q", rows.q, persistent=False)  # moved by .to() with the model
        self.register_buffer("scale", rows.scale, persistent=False)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.rows.q, self.rows.scale = self.q, self.scale
        return out


class _Int8Embedding(_Int8Module):
    def __init__(self, rows: Int8Rows, embed_scale=None):
        super().__init__(rows)
        self.embed_scale = None if embed_scale is None else float(embed_scale)
        self.num_embeddings, self.embedding_dim = rows.q.shape

    def forward(self, input_ids):
        x = self.rows.rows(input_ids)
        return x * self.embed_scale if self.embed_scale is not None else x


class _Int8Head(_Int8Module):
    def __init__(self, rows: Int8Rows):
        super().__init__(rows)
        self.out_features, self.in_features = rows.q.shape

    def forward(self, x):
        return self.rows.logits(x.float())
