"""Named recipes (one per paper) and named sizes. `ModelConfig.from_preset(name, size)` combines them.

Every preset except `pre-ln` starts from the LLaMA-style base the depth papers use (RMSNorm, SwiGLU, RoPE,
Pre-LN) and changes only what its paper changes, so presets differ from `pre-rmsnorm` in exactly the
fields listed by `layerwise presets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

SIZES: dict[str, dict[str, Any]] = {
    # Byte-level vocabulary: trains on 2 CPU cores in seconds.
    "tiny": dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=256),
    "124m": dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024),
    "350m": dict(vocab_size=50304, d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024),
    # Llama-3.2-1B's shape with a GPT-2-sized vocabulary.
    "1b": dict(vocab_size=50304, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, max_seq_len=2048),
}


@dataclass(frozen=True)
class Preset:
    name: str
    paper: str  # the paper this recipe reproduces, one line
    fields: dict[str, Any] = field(default_factory=dict)
    # Fields that depend on the size (e.g. how many AttnRes blocks divide the depth).
    sized_fields: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def resolve(self, size_fields: dict[str, Any]) -> dict[str, Any]:
        extra = self.sized_fields(size_fields) if self.sized_fields else {}
        return {**self.fields, **extra}


def _block_attnres_blocks(size: dict[str, Any]) -> dict[str, Any]:
    # Blocks hold whole layers, so N divides L; of those, the N closest to the paper's ~8 (the larger on a tie):
    # 12 layers -> 6 blocks of 2 layers, 16 and 24 layers -> 8 blocks, 4 layers -> 4 blocks of one layer.
    n_layers = size["n_layers"]
    divisors = [n for n in range(1, n_layers + 1) if n_layers % n == 0]
    return {"attnres_blocks": min(divisors, key=lambda n: (abs(n - 8), -n))}


def _delta_blocks(size: dict[str, Any]) -> dict[str, Any]:
    return {"attnres_blocks": min(4, size["n_layers"])}  # the Delta AttnRes code's default num_blocks = 4


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("pre-ln", "Pre-LN GPT-2 style (Xiong et al., ICML 2020): LayerNorm, GELU MLP",
               dict(norm="layernorm", norm_eps=1e-5, mlp="gelu")),
        Preset("pre-rmsnorm", "Pre-RMSNorm LLaMA baseline (Touvron et al., 2023; Jiang et al., NeurIPS 2023)"),
        Preset("post-ln", "Post-LN (Vaswani et al., NeurIPS 2017)", dict(norm_placement="post")),
        Preset("peri-ln", "Peri-LN (Kim et al., ICML 2025): norms around each sublayer and on the embedding",
               dict(norm_placement="peri", embedding_norm=True)),
        Preset("mix-ln", "Mix-LN (Li, Yin, Liu; ICLR 2025): Post-LN for the first 25% of layers",
               dict(norm_placement="mixln", mixln_ratio=0.25)),
        Preset("deepnorm", "DeepNorm (Wang et al., DeepNet 2022)", dict(norm_placement="deepnorm")),
        Preset("lns", "LayerNorm Scaling (Sun et al., NeurIPS 2025, 'The Curse of Depth in LLMs')",
               dict(layernorm_scaling=True)),
        Preset("dyt", "Dynamic Tanh (Zhu et al., CVPR 2025), LLaMA recipe: no beta, alpha0 0.8/0.2/0.2, emb scale",
               dict(norm="dyt", norm_bias=False, dyt_alpha_attn=0.8, dyt_alpha_mlp=0.2, dyt_alpha_final=0.2,
                    embedding_scale=True)),
        Preset("bhyt", "BHyT (Byun et al., arXiv 2601.09719), parallel form, lambda 2/1/0, kappa 10",
               dict(norm="bhyt")),
        Preset("bhyt-star", "BHyT* (Byun et al., arXiv 2601.09719): exact RMS at both norms",
               dict(norm="bhyt", bhyt_exact=True)),
        Preset("bhyt-beta", "BHyT (Byun et al., arXiv 2601.09719), var_approx beta: a learnable weight on c lambda^2 "
               "/ kappa^2", dict(norm="bhyt", bhyt_var_approx="beta")),
        Preset("bhyt-eta", "BHyT (Byun et al., arXiv 2601.09719), var_approx eta: the MLP-input variance is v (1 + "
               "eta), no c", dict(norm="bhyt", bhyt_var_approx="eta")),
        Preset("bhyt-residual-aware", "BHyT (Byun et al., arXiv 2601.09719), var_approx residual_aware: v (1 + beta) "
               "+ alpha c lambda^2 / kappa^2", dict(norm="bhyt", bhyt_var_approx="residual_aware")),
        Preset("seednorm", "SeeDNorm (Cai et al., ICLR 2026), single head, alpha0 1", dict(norm="seednorm")),
        Preset("ssrmsnorm", "Single-Scale RMSNorm (Park et al., ACL 2025, 'Outlier-Safe Pre-Training'): one scalar "
               "gain in every RMSNorm, final norm included; OSP's EmbProj and Muon are not part of it",
               dict(norm="ssrmsnorm")),
        Preset("prepbn", "PRepBN (Guo, Chen, Tang, Wang; ICML 2024, 'SLAB'): every norm, the final one included, "
               "LayerNorm decaying linearly into RepBN = BatchNorm + eta x over the first 16% of the run",
               dict(norm="prepbn", norm_eps=1e-5)),
        Preset("un", "Unified Normalization (Yang et al., ACM MM 2022, 'Unified Normalization for Accelerating and "
               "Stabilizing Transformers'): running-statistics norms everywhere, warm-up 4000 steps, eps 1e-5",
               dict(norm="un", norm_eps=1e-5)),
        Preset("powernorm", "PowerNorm (Shen et al., ICML 2020, 'PowerNorm: Rethinking Batch Normalization in "
               "Transformers'): GroupScaling then running quadratic means, warm-up 10000 steps, eps 1e-5",
               dict(norm="powernorm", norm_eps=1e-5)),
        Preset("iwd", "Input-Norm weight decay (Wang et al., arXiv 2605.26895, 'Negligible in Size, Significant in "
               "Effect'): decay the gains of the norms a linear reads, not the others'", dict(norm_gain_decay="input")),
        Preset("hg", "Heterogeneous gains (Wang et al., arXiv 2605.26895, 'Negligible in Size, Significant in "
               "Effect', HG): q, k, v, gate and up each read the pre-sublayer RMSNorm through their own gain",
               dict(heterogeneous_gains=True)),
        Preset("attnres", "Full Attention Residuals (Kimi Team, arXiv 2603.15031)", dict(residual="full_attnres")),
        Preset("block-attnres", "Block Attention Residuals (Kimi Team, arXiv 2603.15031): whole layers per block, "
               "the number of blocks dividing L nearest the paper's 8",
               dict(residual="block_attnres"), _block_attnres_blocks),
        Preset("delta-attnres", "Delta AttnRes (Luo, Cai, Hu): additive routing over per-sublayer deltas",
               dict(residual="delta_attnres")),
        Preset("delta-block-attnres", "Delta Block AttnRes (Luo, Cai, Hu): routing over per-block deltas, N = 4",
               dict(residual="delta_block_attnres"), _delta_blocks),
        Preset("delta-block-attnres-released", "Delta Block AttnRes (Luo, Cai, Hu) with the released code's "
               "alternating-sum block sources [e, D0, e+D1, D0+D2, ...], for the A/B against the block deltas",
               dict(residual="delta_block_attnres", delta_block_sources="released"), _delta_blocks),
        Preset("resformer", "ResFormer value residual (Zhou et al., 2024)", dict(value_residual="resformer")),
        # QK-norm stays off here as in `resformer` and `pre-rmsnorm`, so the three differ only in the value residual;
        # the SATFormer configs turn it on for all three: pass qk_norm=True to each to reproduce that setting.
        Preset("satformer", "SATFormer (Gunasekaran et al., arXiv 2605.03953): gated access to layer-0 values; "
               "QK-norm off like resformer and the baseline (the paper's configs set it on all three)",
               dict(value_residual="satformer")),
        Preset("satformer-softmax", "SATFormer (Gunasekaran et al., arXiv 2605.03953), softmax gate: the KV heads "
               "share H_kv units of V_1 per token", dict(value_residual="satformer", value_residual_gate="softmax")),
        Preset("satformer-softmax-sigmoid", "SATFormer (Gunasekaran et al., arXiv 2605.03953), softmax gate times a "
               "sigmoid per head", dict(value_residual="satformer", value_residual_gate="softmax_sigmoid")),
    ]
}


def preset_fields(name: str, size: str) -> dict[str, Any]:
    """All ModelConfig fields of preset `name` at `size` (before user overrides)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
    size_fields = SIZES[size]
    return {**size_fields, **PRESETS[name].resolve(size_fields), "preset": name}
