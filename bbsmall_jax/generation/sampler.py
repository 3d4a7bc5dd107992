"""What generation keeps for one model between calls: its jitted programs and its decoding weights.

A model holds one `Sampler` (`model.sampler`) for as long as it holds its module, as gemma's `Sampler`
holds a transformer's; `generate` and the decode engine take their programs and placed weights from it.
"""

from __future__ import annotations

from typing import Optional

import jax

from bbsmall_jax.generation import plan as plan_lib
from bbsmall_jax.generation.engine_programs import compile_programs
from bbsmall_jax.generation.program import compile_program
from bbsmall_jax.generation.sharding import replicated


class Sampler:
    """The jitted generation program of each decoding plan used so far, the decode engine's programs of each
    engine setting, and the plan's copies of the weights (`DecodingPlan.decoding_weights`) for the params last
    decoded with, placed on the mesh last used.

    The copies are remade when the params change (a different leaf) or the plan needs another layout.
    """

    def __init__(self, module, seq2seq: bool):
        self.module, self.seq2seq = module, seq2seq
        self._programs: dict = {}  # DecodingPlan -> generate's program; EngineSpec -> the engine's programs
        self._weights: Optional[tuple] = None  # (the params' leaves, the LM-head layout, the decoding weights)
        # (key: the mesh, layout and ids of the leaves, placed (params, weights), the unplaced ones: kept alive
        # so that no other array takes their ids)
        self._placement: Optional[tuple] = None

    def program(self, plan: plan_lib.DecodingPlan):
        """The jitted program of one plan (made on first use)."""
        if plan not in self._programs:
            self._programs[plan] = compile_program(self.module, self.seq2seq, plan)
        return self._programs[plan]

    def engine_programs(self, spec) -> dict:
        """The decode engine's jitted programs for one `EngineSpec` (made on first use), so that every engine
        made with the same settings reuses what an earlier one compiled."""
        if spec not in self._programs:
            self._programs[spec] = compile_programs(self.module, spec)
        return self._programs[spec]

    def decoding_weights(self, params, plan: plan_lib.DecodingPlan) -> tuple:
        """The plan's copies of the weights of `params`, kept for later calls with the same params and layout."""
        sources = jax.tree_util.tree_leaves(params)
        kept = self._weights
        if kept is None or kept[1] != plan.lm_head or len(kept[0]) != len(sources) or any(
                old is not new for old, new in zip(kept[0], sources)):
            kept = self._weights = (sources, plan.lm_head, plan.decoding_weights(params))
        return kept[2]

    def placed_weights(self, params, plan: plan_lib.DecodingPlan, mesh) -> tuple:
        """(params, decoding weights) replicated over the mesh (as they are without one), kept while the params
        and mesh stay the same."""
        weights = self.decoding_weights(params, plan)
        if mesh is None:
            return params, weights
        key = (mesh, plan.lm_head, tuple(map(id, jax.tree_util.tree_leaves((params, weights)))))
        if self._placement is None or self._placement[0] != key:
            self._placement = (key, (replicated(params, mesh), replicated(weights, mesh)), (params, weights))
        return self._placement[1]
