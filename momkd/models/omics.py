"""Omics autoencoder (§3.2): MLP encoder G -> hidden -> D and a symmetric decoder D -> hidden -> G."""

from __future__ import annotations

from torch import Tensor, nn

LAYOUTS = ("paper", "official")


def _block(d_in: int, d_out: int, dropout: float) -> list[nn.Module]:
    return [nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.ReLU(), nn.Dropout(dropout)]


class OmicsAutoencoder(nn.Module):
    """Encoder G -> D and decoder D -> G, one slide's omics vector per row.

    ``layout="paper"``: encoder (Linear, LayerNorm, ReLU, Dropout) x 2 -> F_omics (B, D). ``layout="official"``:
    the authors' encoder, one such block then a plain Linear(hidden, D) (no LayerNorm/ReLU/Dropout after it).
    The decoder is the same in both: (Linear, LayerNorm, ReLU, Dropout) then Linear -> reconstruction (B, G)
    (linear output for z-scored or raw expression). Submodule indices match the authors' ``nn.Sequential`` in the
    official layout (``encoder.0`` Linear, ``encoder.1`` LayerNorm, ``encoder.4`` Linear).
    """

    def __init__(self, n_genes: int, hidden: int, dim: int, dropout: float = 0.25, layout: str = "paper") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
        self.n_genes, self.hidden, self.dim, self.layout = n_genes, hidden, dim, layout
        tail = _block(hidden, dim, dropout) if layout == "paper" else [nn.Linear(hidden, dim)]
        self.encoder = nn.Sequential(*_block(n_genes, hidden, dropout), *tail)
        self.decoder = nn.Sequential(*_block(dim, hidden, dropout), nn.Linear(hidden, n_genes))

    def encode(self, omics: Tensor) -> Tensor:
        return self.encoder(omics)

    def decode(self, embedding: Tensor) -> Tensor:
        return self.decoder(embedding)

    def forward(self, omics: Tensor) -> tuple[Tensor, Tensor]:
        """omics (B, G) -> (F_omics (B, D), reconstruction (B, G))."""
        embedding = self.encode(omics)
        return embedding, self.decode(embedding)
