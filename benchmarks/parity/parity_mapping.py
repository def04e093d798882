"""Parameter-name mapping from the authors' ``MKD`` to our ``MoMKD`` (``--preset official``).

The same table is in ``benchmarks/parity/README.md``. Every parameter on either side is mapped exactly once
(checked by :func:`copy_official_into_ours`); the only unmapped entries are their VQ buffers that ``ema_update=False``
never reads (``initted``, ``cluster_size``, ``embed_avg``).
"""

from __future__ import annotations

from typing import Any

# (their name or prefix, our name or prefix). A rule ending in "." maps a prefix, otherwise the exact name.
RULES: tuple[tuple[str, str], ...] = (
    ("wsi_encoder.gat1.", "encoder.gat1."),  # att, bias, lin_l.{weight,bias}, lin_r.{weight,bias}
    ("wsi_encoder.gat2.", "encoder.gat2."),
    ("wsi_encoder.res_proj1.", "encoder.res1."),
    ("wsi_encoder.ln1.", "encoder.norm1."),
    ("wsi_encoder.ln2.", "encoder.norm2."),
    ("wsi_patch_projector.", "head.proj."),
    ("attn_log_tau", "head.log_tau"),
    ("mem_pos._codebook.embed", "memory.positive"),  # (1, n, D_N) -> (n, D_N): their codebook [0]
    ("mem_neg._codebook.embed", "memory.negative"),
    ("wsi_classifier_proto.", "classifier."),  # 0 LayerNorm, 1 Linear, 4 Linear (same Sequential indices)
    ("wsi_pool_projector.", "slide_proj."),
    ("rna_tower.encoder.", "omics.encoder."),  # 0 Linear, 1 LayerNorm, 4 Linear (omics_layout="official")
    ("rna_decoder.decoder.", "omics.decoder."),  # 0 Linear, 1 LayerNorm, 4 Linear
    ("rna_projector.", "omics_proj."),
)
UNMAPPED_BUFFERS = ("initted", "cluster_size", "embed_avg")  # their VQ EMA state, unused with ema_update=False
CODEBOOKS = ("mem_pos._codebook.embed", "mem_neg._codebook.embed")


def our_name(their: str) -> str | None:
    """Our state_dict name for one of theirs (None: deliberately unmapped)."""
    for src, dst in RULES:
        if src.endswith("."):
            if their.startswith(src):
                return dst + their[len(src):]
        elif their == src:
            return dst
    return None


def to_ours(their: str, value: Any) -> Any:
    """Their tensor in our layout (the codebooks drop their leading ``num_codebooks = 1`` axis)."""
    return value[0] if their in CODEBOOKS else value


def copy_official_into_ours(theirs: Any, ours: Any) -> dict[str, str]:
    """Copy every parameter of their model into ours; returns {their name: our name}.

    Raises ValueError on any unmapped parameter, name collision, shape mismatch or parameter of ours left unset.
    """
    import torch

    our_state = dict(ours.state_dict())
    mapping: dict[str, str] = {}
    problems: list[str] = []
    with torch.no_grad():
        for name, value in theirs.state_dict().items():
            dst = our_name(name)
            if dst is None:
                if name.rsplit(".", 1)[-1] not in UNMAPPED_BUFFERS:
                    problems.append(f"their {name} has no rule")
                continue
            if dst not in our_state:
                problems.append(f"their {name} -> our {dst}: no such entry")
                continue
            if dst in mapping.values():
                problems.append(f"our {dst} is mapped twice")
                continue
            src = to_ours(name, value)
            if tuple(src.shape) != tuple(our_state[dst].shape):
                problems.append(f"their {name} {tuple(src.shape)} vs our {dst} {tuple(our_state[dst].shape)}")
                continue
            our_state[dst].copy_(src)
            mapping[name] = dst
    left = sorted(set(our_state) - set(mapping.values()))
    if left:
        problems.append(f"ours left unset: {', '.join(left)}")
    their_params = {n for n, _ in theirs.named_parameters()}
    if not their_params <= set(mapping):
        problems.append(f"their parameters unmapped: {', '.join(sorted(their_params - set(mapping)))}")
    if problems:
        raise ValueError("parameter mapping failed: " + "; ".join(problems))
    return mapping
