"""The per-forward routing context, and skill chains read back from it.

An FFN never sees the attention mask, the input ids or the skill labels, and
in cached decoding it sees one token at a time. The model therefore fills a
`RoutingState` before each forward (which tokens are real, which are image
tokens, forced skill labels, whether this forward continues a cached
sequence), and the MoSE blocks leave in it what the caller needs afterwards:
router logits for the skill loss, routes for skill chains, balance losses for
the token-MoE baseline, and tokens per expert for analysis.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mose.skills.taxonomy import Taxonomy


@dataclass(frozen=True)
class Dispatch:
    """Rows (samples or tokens) grouped by expert on the device, with no host sync.

    Each of the N rows has k slots (its top-k experts). Slots are sorted by expert
    (stably), so expert e's slots are the contiguous range [ends[e-1], ends[e]) of
    the sorted order; an unused expert has an empty range. Every shape here is fixed
    by (N, k, E) alone, not by the routes: a compiled graph serves every routing decision.
    """

    order: torch.Tensor  # (N·k,) long: the slots in expert order
    source: torch.Tensor  # (N·k,) long: the row of each sorted slot (order // k)
    inverse: torch.Tensor  # (N·k,) long: where each slot sits in the sorted order
    ends: torch.Tensor  # (E,) int32: cumulative end of each expert's group of sorted slots


def dispatch(experts: torch.Tensor, num_experts: int) -> Dispatch:
    """Group rows by expert. experts: (N, k) long, in [0, num_experts)."""
    rows, k = experts.shape
    slots = experts.reshape(-1)  # (N·k,)
    order = slots.argsort(stable=True)  # (N·k,)
    ids = torch.arange(num_experts, device=slots.device, dtype=slots.dtype)  # (E,)
    ends = torch.searchsorted(slots[order], ids, right=True, out_int32=True)  # (E,)
    positions = torch.arange(order.numel(), device=order.device)  # (N·k,)
    inverse = torch.empty_like(order).scatter_(0, order, positions)  # (N·k,)
    return Dispatch(order, order // k, inverse, ends)


def weight_on(experts: torch.Tensor, weights: torch.Tensor, expert: int) -> torch.Tensor:
    """Each row's weight on one expert, 0 where it did not choose it: experts, weights (N, k) → (N,)."""
    return (weights * (experts == expert)).sum(dim=1)


@dataclass
class Route:
    """The route of one MoSE layer for a batch: per sample, not per token."""

    experts: torch.Tensor  # (B, k) long: chosen skill indices
    weights: torch.Tensor  # (B, k): mixing weights of the chosen experts
    probs: torch.Tensor  # (B, S) float32: router probabilities over the level's skills
    plan: Dispatch | None = None  # samples grouped by expert: made once, reused at every decode step
    # The experts every sample of the batch routes to, sorted, when the host knows it (a decode
    # batch of one route, `mose.eval.regroup`): blocks without modality groups then run them on
    # the whole batch, with no dispatch (blocks with groups, and compiled graphs, dispatch as
    # always). None: samples may differ (the experts are only on the device).
    common: tuple[int, ...] | None = None

    def dispatch(self, num_experts: int) -> Dispatch:
        """This route's samples grouped by expert (`dispatch`), made on first use."""
        if self.plan is None:
            self.plan = dispatch(self.experts, num_experts)
        return self.plan


@dataclass
class RoutingState:
    token_mask: torch.Tensor | None = None  # (B, T) bool: real (non-padding) tokens
    # (B, T) bool: the tokens routers average over, when not all the real ones
    # (training passes the prompt's, so a route never depends on the answer it is trained to give)
    route_mask: torch.Tensor | None = None
    image_mask: torch.Tensor | None = None  # (B, T) bool: image tokens
    skill_labels: torch.Tensor | None = None  # (B, L) long: forced skill per level
    decoding: bool = False  # this forward continues a cached sequence
    reuse_routes: bool = False  # a decode step with "once" routing: keep the prompt's route
    # generate's prefill: the forward brings a new prompt (maybe after a filled cache), so
    # "once" routing routes again, on the mean over every token cached so far and the prompt's
    prefilling: bool = False
    cached_tokens: int = 0  # positions the running totals cover (the cache's length, kept in step)
    routes: dict[int, Route] = field(default_factory=dict)
    running: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    router_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # this forward only
    # layer → (B, H) float32: the mean hidden state each router read, this forward only;
    # router pretraining learns from these alone, with no backward through the model.
    router_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    aux_losses: dict[int, torch.Tensor] = field(default_factory=dict)  # this forward only
    # layer → (experts per token (B, T, k) or (N, k), real-token mask, number of experts);
    # counted only when asked (`tokens_per_expert`), so decoding does not pay for it.
    assignments: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)

    def __deepcopy__(self, memo: dict) -> RoutingState:
        # What a forward leaves here (router logits with their graph) belongs to that
        # forward; a copied model starts clean, its blocks sharing the one new state.
        return RoutingState()

    def begin(
        self,
        *,
        seq_len: int,
        attention_mask: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        routing_mask: torch.Tensor | None = None,
        skill_labels: torch.Tensor | None,
        past_length: int,
        decode_routing: str,
    ) -> None:
        """Set up for one forward pass over `seq_len` new tokens after `past_length` cached ones."""
        decoding = past_length > 0
        if decoding and self.prefilling and past_length != self.cached_tokens:
            raise RuntimeError(
                f"the cache holds {past_length} tokens but this model's routing state covers "
                f"{self.cached_tokens}: MoSE routes read the mean hidden state of every cached token, "
                "which the model keeps while it fills the cache, so a cache filled, copied or cropped "
                "elsewhere cannot be continued; pass the whole sequence without a cache")
        if attention_mask is not None and attention_mask.dim() == 2:
            # During cached decoding the mask covers past + new tokens: keep the new ones.
            self.token_mask = attention_mask[:, -seq_len:].bool()  # (B, T)
        else:
            self.token_mask = None
        self.route_mask = None if routing_mask is None else routing_mask[:, -seq_len:].bool()  # (B, T)
        if self.route_mask is not None and self.token_mask is not None:
            self.route_mask = self.route_mask & self.token_mask
        self.image_mask = image_mask
        self.skill_labels = skill_labels
        self.decoding = decoding
        self.reuse_routes = decoding and decode_routing == "once" and not self.prefilling
        self.cached_tokens = past_length + seq_len
        # New dicts, not cleared ones: a compiled forward would guard on what the previous
        # forward left in them (empty or not), and compile twice.
        if not decoding:
            self.routes, self.running = {}, {}
        self.router_logits, self.router_inputs, self.aux_losses, self.assignments = {}, {}, {}, {}

    @property
    def tokens_per_expert(self) -> dict[int, torch.Tensor]:
        """Layer → real tokens sent to each expert in the last forward, (E,) long."""
        counts = {}
        for layer, (experts, mask, num_experts) in self.assignments.items():
            chosen = experts[mask.bool()].reshape(-1)
            counts[layer] = torch.bincount(chosen, minlength=num_experts)
        return counts

    def real_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T) float mask of real tokens for hidden states of shape (B, T, H)."""
        return self._mask(self.token_mask, hidden)

    def routed_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(B, T) bool mask of the tokens a router averages over (the real ones unless told),
        or None when it averages over every token."""
        mask = self.token_mask if self.route_mask is None else self.route_mask
        return None if mask is None else self._checked(mask, hidden)

    def _mask(self, mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
        if mask is None:
            return hidden.new_ones(hidden.shape[:2], dtype=torch.float32)
        return self._checked(mask, hidden).float()

    @staticmethod
    def _checked(mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if mask.shape != hidden.shape[:2]:
            raise RuntimeError(
                f"routing mask of shape {tuple(mask.shape)} does not match hidden "
                f"states {tuple(hidden.shape[:2])}: call the model, not its layers, directly"
            )
        return mask


def skill_label_tensor(
    labels: torch.Tensor | Sequence[Mapping[str, str] | None] | Mapping[str, torch.Tensor],
    taxonomy: Taxonomy,
    batch_size: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Skill labels in any accepted form → a checked (B, L) long tensor.

    Accepted: a (B, L) tensor of skill indices; a list of B dicts
    {level: skill} (missing levels are `general`); a dict {level: (B,) tensor}.
    """
    levels = taxonomy.levels
    if isinstance(labels, Mapping):
        unknown = set(labels) - set(taxonomy.level_names)
        if unknown:
            raise ValueError(f"skill_labels name unknown level(s) {sorted(unknown)}")
        general = [level.index("general") for level in levels]
        columns = [
            torch.as_tensor(labels[level.name]) if level.name in labels
            else torch.full((batch_size,), general[i], dtype=torch.long)
            for i, level in enumerate(levels)
        ]
        labels = torch.stack(columns, dim=1)  # (B, L)
    elif not isinstance(labels, torch.Tensor):
        labels = taxonomy.encode_batch(list(labels))
    labels = labels.long()
    if labels.shape != (batch_size, len(levels)):
        raise ValueError(
            f"skill_labels has shape {tuple(labels.shape)}; expected ({batch_size}, {len(levels)}) "
            f"for a batch of {batch_size} and levels {taxonomy.level_names}"
        )
    if not torch.compiler.is_compiling():  # reads the labels on the host: it would break a graph
        _check_label_range(labels, levels)  # (compiled, a bad label fails in the routing loss)
    return labels.to(device) if device is not None else labels


def _check_label_range(labels: torch.Tensor, levels) -> None:
    """One device→host read however large the batch (it runs at every teacher-forced step)."""
    sizes = torch.tensor([len(level.skills) for level in levels], device=labels.device)  # (L,)
    wrong = (labels < 0) | (labels >= sizes)  # (B, L)
    if not wrong.any():
        return
    i = int(wrong.any(dim=0).nonzero()[0])
    level = levels[i]
    raise ValueError(
        f"skill_labels for level {level.name!r} hold index {labels[:, i].tolist()}; "
        f"valid: 0..{len(level.skills) - 1} ({', '.join(level.skills)})"
    )


@dataclass(frozen=True)
class SkillChoice:
    """The skill chosen at one level, with its probability (mean over the level's layers)."""

    level: str
    skill: str
    prob: float
    layers: tuple[tuple[int, str, float], ...]  # (layer index, chosen skill, its probability)


@dataclass(frozen=True)
class SkillChain:
    """One sample's explanation: the skill chosen at each level, in order."""

    choices: tuple[SkillChoice, ...]

    def as_dict(self) -> dict[str, str]:
        return {choice.level: choice.skill for choice in self.choices}

    def __str__(self) -> str:
        return " → ".join(f"{c.level}: {c.skill} ({c.prob:.2f})" for c in self.choices)


def skill_chain_list(
    routes: Mapping[int, Route], level_of_layer: Mapping[int, int], taxonomy: Taxonomy
) -> list[SkillChain]:
    """Per sample, the skill chosen at each level, from the routes of the last forward.

    A level's skill is the one its layers chose most often (ties go to the higher
    mean probability); its probability is the mean router probability over those
    layers. Every route is read to the host in one copy, not sample by sample.
    """
    if not routes:
        raise RuntimeError("no routes recorded yet: run a forward pass or generate() first")
    layers = sorted(routes)
    widths = [routes[i].probs.shape[1] for i in layers]
    columns = [routes[i].experts[:, :1].float() for i in layers] + [routes[i].probs.float() for i in layers]
    table = torch.cat(columns, dim=1).cpu()  # (B, layers + Σ skills): the one device→host copy
    chosen = table[:, :len(layers)].long().tolist()  # B lists of one skill per layer
    probs = [p.tolist() for p in table[:, len(layers):].split(widths, dim=1)]  # per layer, B lists of S
    chains = []
    for b in range(table.shape[0]):
        choices = []
        for level_idx, level in enumerate(taxonomy.levels):
            picks = [(i, chosen[b][j], probs[j][b]) for j, i in enumerate(layers)
                     if level_of_layer.get(i) == level_idx]
            votes = Counter(skill for _, skill, _ in picks)

            def mean_prob(skill: int, picks=picks) -> float:
                return sum(p[skill] for _, _, p in picks) / len(picks)

            best = max(votes, key=lambda s: (votes[s], mean_prob(s)))
            choices.append(SkillChoice(
                level=level.name,
                skill=level.skills[best],
                prob=mean_prob(best),
                layers=tuple((i, level.skills[s], p[s]) for i, s, p in picks),
            ))
        chains.append(SkillChain(tuple(choices)))
    return chains
