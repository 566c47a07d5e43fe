"""Error feedback around any codec (Stich, Cordonnier & Jaggi 2018, "Sparsified SGD with memory";
Karimireddy et al. 2019, "Error feedback fixes SignSGD and other gradient compression schemes", Alg. 2).

Worker k keeps a residual e_k per tensor, encodes u_k = Δ_k + e_k instead of Δ_k, and keeps what was not
sent: e_k <- u_k − D(C(u_k)). A worker whose payload is dropped (``faults.drop_prob``) sent nothing and
keeps all of u_k. The residuals are per worker ([K_local, ...], float64) and belong to the workers'
checkpoint state, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from dpl.comm.codecs import Codec, Key, Payload
from dpl.errors import CheckpointError


class ErrorFeedback(Codec):
    """``codec`` with a residual per worker and tensor (see the module doc); a codec itself."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.collective = codec.collective
        self.residuals: Optional[list[torch.Tensor]] = None  # [K_local, ...] float64, one per parameter

    def start(self, like: Sequence[torch.Tensor]) -> None:
        """Zero residuals shaped like the workers' stacked parameters ``like``."""
        self.residuals = [torch.zeros(t.shape, dtype=torch.float64, device=t.device) for t in like]

    @torch.no_grad()
    def encode(self, rows: torch.Tensor, key: Key, dropped: Optional[torch.Tensor] = None) -> Payload:
        e = self.residuals[key.tensor]
        u = rows + e.view_as(rows)  # u_k = Δ_k + e_k
        payload = self.codec.encode(u, key)
        sent = self.codec.decode(payload, u.shape[1], key)
        if dropped is not None:  # a dropped worker sent nothing: all of u_k waits for the next sync
            sent = sent * (~dropped).to(sent.device, sent.dtype).unsqueeze(1)
        e.copy_((u - sent).view_as(e))  # e_k <- u_k − D(C(u_k))
        return payload

    def decode(self, payload: Payload, n: int, key: Key) -> torch.Tensor:
        return self.codec.decode(payload, n, key)

    def payload_bytes(self, n: int) -> int:
        return self.codec.payload_bytes(n)

    # ------------------------------------------------------------------ checkpoints (per worker)
    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {"residuals": [e.clone() for e in self.residuals]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("residuals")
        if saved is None:
            raise CheckpointError("the checkpoint holds no error-feedback residuals: it was written by a run "
                                  "without compression.error_feedback=true")
        with torch.no_grad():
            for e, s in zip(self.residuals, saved):
                e.copy_(s)
