"""Pieces the large-checkpoint benchmarks share: a random Llama-shaped checkpoint written shard by shard, and a
measurement of one command's wall time and peak RSS.

``bench/fold.py`` (streaming fold vs in-memory fold) and ``bench/large_apply.py`` (apply, verify and locate on a
checkpoint larger than memory) both need a checkpoint of a given shape that was never held in memory whole, and both
measure child processes the same way, so the numbers of the two pages of docs/performance.md are comparable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

MB = 1024 * 1024
SHARD_BYTES = 1 << 30


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder's sizes (grouped-query attention, gated MLP)."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    tie: bool

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden, intermediate_size=self.ffn, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                           head_dim=self.head_dim, vocab_size=self.vocab, tie_word_embeddings=self.tie,
                           max_position_embeddings=8192, dtype="bfloat16")

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        h, f, kv = self.hidden, self.ffn, self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        shapes = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                       (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                       (p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,)),
                       (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                       (p + "mlp.down_proj.weight", (h, f))]
        shapes.append(("model.norm.weight", (h,)))
        if not self.tie:
            shapes.append(("lm_head.weight", (self.vocab, h)))
        return shapes

    def n_bytes(self) -> int:
        """bf16 bytes of the whole checkpoint."""
        return sum(2 * torch.Size(s).numel() for _, s in self.tensor_shapes())

    def block_bytes(self) -> int:
        """bf16 bytes of one decoder block."""
        return sum(2 * torch.Size(s).numel() for n, s in self.tensor_shapes() if n.startswith("model.layers.0."))


def make_checkpoint(folder: Path, shape: Shape, shard_bytes: int = SHARD_BYTES) -> dict:
    """Random bf16 tensors written shard by shard (memory: one shard), with config.json and the index, as
    ``save_pretrained`` shards. Norm weights are ones (a random norm would make the activations meaningless)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    shape.config().save_pretrained(folder)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in shape.tensor_shapes():
        n = 2 * torch.Size(dims).numel()
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, dims))
        size += n
    gen = torch.Generator().manual_seed(0)
    weight_map, total, largest = {}, 0, 0
    for i, group in enumerate(groups, start=1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, dims in group:
            t = torch.empty(dims, dtype=torch.bfloat16)
            tensors[name] = t.fill_(1.0) if name.endswith("norm.weight") else t.normal_(0, 0.02, generator=gen)
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        largest = max([largest, *(t.nbytes for t in tensors.values())])
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    params = sum(torch.Size(s).numel() for _, s in shape.tensor_shapes())
    return {"params": params, "bytes": total, "shards": len(groups), "largest": largest}


#: A small process that starts the measured one and reports its wall time, CPU time and peak RSS. On Linux a
#: child's peak RSS starts at its parent's RSS at fork (it survives exec), so the parent must be small: ~10 MB.
_WRAPPER = (
    "import json, os, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)\n"
    "out = p.stdout.read()\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(json.dumps({'wall': time.perf_counter() - t, 'rss_mb': usage.ru_maxrss / 1024,\n"
    "                  'cpu': usage.ru_utime + usage.ru_stime,\n"
    "                  'written_mb': usage.ru_oublock * 512 / 2**20,\n"
    "                  'code': os.waitstatus_to_exitcode(status), 'out': out}))\n"
)


def measure(cmd: list[str], env: dict[str, str] | None = None, check: bool = True) -> dict:
    """Wall time, CPU time and peak RSS of one command (through :data:`_WRAPPER`), then the time of the ``sync``
    after it. The command's last stdout line, when it is JSON, is merged into the result; its whole stdout is kept
    under ``stdout``."""
    done = subprocess.run([sys.executable, "-S", "-c", _WRAPPER, *cmd], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    r = json.loads(done.stdout)
    if check and r["code"] != 0:
        raise SystemExit(f"{cmd} failed with exit code {r['code']}")
    t1 = time.perf_counter()
    os.sync()
    out = r.pop("out")
    lines = out.strip().splitlines()
    try:
        extra = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        extra = {}
    return {**r, "sync": time.perf_counter() - t1, "stdout": out, **(extra if isinstance(extra, dict) else {})}


def drop_page_cache_of(folder: Path) -> None:
    """Ask the kernel to forget the cached pages of ``folder``'s files (``posix_fadvise DONTNEED``), so the next
    reader reads the disk as a cold start would; needs no privileges, unlike ``drop_caches``."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())
