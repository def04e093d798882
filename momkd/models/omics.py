"""Omics autoencoder (§3.2): MLP encoder G -> hidden -> D and a symmetric decoder D -> hidden -> G."""

from __future__ import annotations

from torch import Tensor, nn


def _block(d_in: int, d_out: int, dropout: float) -> list[nn.Module]:
    return [nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.ReLU(), nn.Dropout(dropout)]


class OmicsAutoencoder(nn.Module):
    """``encoder``: (Linear, LayerNorm, ReLU, Dropout) x 2 -> F_omics (B, D);
    ``decoder``: (Linear, LayerNorm, ReLU, Dropout) then Linear -> reconstruction (B, G) (linear output for
    z-scored expression)."""

    def __init__(self, n_genes: int, hidden: int, dim: int, dropout: float = 0.25) -> None:
        super().__init__()
        self.n_genes, self.hidden, self.dim = n_genes, hidden, dim
        self.encoder = nn.Sequential(*_block(n_genes, hidden, dropout), *_block(hidden, dim, dropout))
        self.decoder = nn.Sequential(*_block(dim, hidden, dropout), nn.Linear(hidden, n_genes))

    def encode(self, omics: Tensor) -> Tensor:
        return self.encoder(omics)

    def decode(self, embedding: Tensor) -> Tensor:
        return self.decoder(embedding)

    def forward(self, omics: Tensor) -> tuple[Tensor, Tensor]:
        """omics (B, G) -> (F_omics (B, D), reconstruction (B, G))."""
        embedding = self.encode(omics)
        return embedding, self.decode(embedding)
