"""Export a MoSE model for engines that know nothing of MoSE: one PEFT LoRA adapter per skill chain.

With LoRA experts (`experts="lora"`) a sample routed along a chain (one skill per
level) computes, at every MoSE layer and target projection, the dense FFN with
weights W + ΔW_shared + ΔW_skill, where each delta is (alpha / r) · B A. Both
deltas stack into one LoRA of rank 2r:

    lora_A = [A_shared; A_skill]      (2r, in)
    lora_B = [B_shared, B_skill]      (out, 2r)
    lora_alpha = 2 · alpha            (PEFT scales by lora_alpha / r' = alpha / r)

so B' A' · lora_alpha / (2r) = (alpha / r)(B_shared A_shared + B_skill A_skill), exactly.
Without a shared expert the adapter is the skill's delta alone (rank r, lora_alpha = alpha).

`export_adapters` writes, atomically (a temporary folder renamed at the end):

    OUT/manifest.json              chains → adapter folders, taxonomy, MoSE layers, base config
    OUT/routers.safetensors        every MoSE layer's router (layers.{i}.weight, bias, input_mean,
                                   input_scale): the routers read hidden states of the MoSE model
    OUT/base/                      the dense base the adapters apply to (save_pretrained of the
                                   base architecture: the MoSE model's own weights, FFNs unchanged)
    OUT/adapters/{name}/           adapter_config.json + adapter_model.safetensors, one per chain

An adapter folder's name is the chain's skills in level order joined by "-"
(`chain_name`), e.g. `vehicle-crossing-yield`; `mose route` maps a record to it.

`export_merged` writes one chain merged into a plain dense checkpoint (LoRA experts:
W + ΔW_shared + ΔW_skill; full experts without a shared expert: the skill's expert).
Full experts with a shared expert are refused, adapters and merges alike: the sum of
two gated FFNs is not one gated FFN. Modality groups are refused too: image and text
tokens of one sample take different deltas, which no single adapter holds.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mose.config import MoSEConfig
from mose.layers.blocks import MoSEBlock, expert_blocks
from mose.layers.experts import Experts
from mose.layers.lora import LoRAExperts
from mose.skills.taxonomy import Taxonomy

MANIFEST = "manifest.json"
ROUTERS = "routers.safetensors"
ADAPTERS = "adapters"
BASE = "base"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "mose-export"
FORMAT_VERSION = 1
PROJECTIONS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}  # LoRA target → module
NAME_RULE = ("the chain's skills in level order joined by '-', each with every character "
             "outside [A-Za-z0-9_.] replaced by '_'")

Chain = tuple[str, ...]  # one skill per level, in level order


class ExportError(ValueError):
    """A model that cannot be exported as asked, or a bad --chain / manifest."""


# --- chains and their names ------------------------------------------------------------------


def chain_name(skills: Sequence[str]) -> str:
    """The adapter folder of a chain (see NAME_RULE), e.g. ("vehicle", "crossing", "yield") →
    "vehicle-crossing-yield"."""
    return "-".join(re.sub(r"[^A-Za-z0-9_.]", "_", skill) for skill in skills)


def all_chains(taxonomy: Taxonomy) -> list[Chain]:
    """Every chain a MoSE model of this taxonomy can choose: the product of the levels' skills."""
    return list(itertools.product(*(level.skills for level in taxonomy.levels)))


def parse_chain(text: str, taxonomy: Taxonomy) -> Chain:
    """`level=skill,level=skill` → a chain; levels left out are `general`."""
    chosen: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        level, sep, skill = item.partition("=")
        if not sep or not level or not skill:
            raise ExportError(f"--chain {text!r}: {item!r} is not LEVEL=SKILL")
        if level in chosen:
            raise ExportError(f"--chain {text!r}: level {level!r} given twice")
        chosen[level] = skill
    unknown = set(chosen) - set(taxonomy.level_names)
    if unknown:
        raise ExportError(f"--chain {text!r}: unknown level(s) {sorted(unknown)}; the taxonomy "
                          f"{taxonomy.name!r} has {', '.join(taxonomy.level_names)}")
    chain = []
    for level in taxonomy.levels:
        skill = chosen.get(level.name, "general")
        if skill not in level.skills:
            raise ExportError(f"--chain {text!r}: unknown skill {skill!r} at level {level.name!r}; "
                              f"known: {', '.join(level.skills)}")
        chain.append(skill)
    return tuple(chain)


def _check_names(chains: Sequence[Chain]) -> None:
    names: dict[str, Chain] = {}
    for chain in chains:
        other = names.setdefault(chain_name(chain), chain)
        if other != chain:
            raise ExportError(f"chains {other} and {chain} share the adapter name {chain_name(chain)!r}: "
                              "rename a skill in the taxonomy")


# --- what can be exported ----------------------------------------------------------------------


def _mose_config(model: Any) -> MoSEConfig:
    cfg = getattr(model, "mose_config", None)
    if not isinstance(cfg, MoSEConfig):
        kind = "a token-MoE model (routes per token)" if cfg is not None else "not a converted MoSE model"
        raise ExportError(f"{type(model).__name__} is {kind}: only MoSE models export per-chain adapters")
    return cfg


def check_exportable(model: Any, *, merge: bool = False) -> MoSEConfig:
    """The model's MoSE config, or an ExportError saying why it cannot be exported this way."""
    cfg = _mose_config(model)
    if cfg.modality_groups:
        raise ExportError(
            "a model with modality groups cannot be exported: each skill has an image and a text "
            "expert, chosen per token, so one sample's image and text tokens take different deltas, "
            "which no single adapter or merged FFN holds")
    if cfg.experts == "full" and cfg.shared_expert:
        raise ExportError(
            "full experts with a shared expert cannot be exported: a MoSE layer computes "
            "shared_FFN(x) + skill_FFN(x), the sum of two gated MLPs, which is not one gated MLP "
            "(act(gate x)·(up x) is not additive), so neither a LoRA adapter nor a merged "
            "checkpoint reproduces it; only LoRA experts (experts=\"lora\") export exactly")
    if cfg.experts == "full" and not merge:
        raise ExportError(
            "full experts cannot be exported as LoRA adapters (a full expert is a whole FFN, "
            "not a low-rank delta); export one chain as a merged dense checkpoint with --merge")
    return cfg


# --- adapters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerInfo:
    layer: int
    level: str
    prefix: str  # the dense model's name of this layer's FFN, e.g. model.language_model.layers.0.mlp

    def module(self, target: str) -> str:
        return f"{self.prefix}.{PROJECTIONS[target]}"


def mose_layers(model: Any) -> list[tuple[LayerInfo, MoSEBlock]]:
    cfg = _mose_config(model)
    level_of_layer = model.level_of_layer
    layers_path = model.mose_arch.layers_path
    return [(LayerInfo(block.layer_idx, cfg.taxonomy.levels[level_of_layer[block.layer_idx]].name,
                       f"{layers_path}.{block.layer_idx}.mlp"), block)
            for block in expert_blocks(model)]


def _skill_index(cfg: MoSEConfig, chain: Chain, level: str) -> int:
    i = cfg.taxonomy.level_names.index(level)
    return cfg.taxonomy.levels[i].index(chain[i])


def adapter_tensors(model: Any, chain: Chain, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The chain's adapter in PEFT's saved key layout (`base_model.model.{module}.lora_A.weight`),
    in `dtype` (default: the model's own)."""
    cfg = _mose_config(model)
    tensors = {}
    for info, block in mose_layers(model):
        skill = _skill_index(cfg, chain, info.level)
        experts: LoRAExperts = block.experts
        for target in experts.targets:
            a, b = [experts.A(target)[skill]], [experts.B(target)[skill]]  # (r, in), (out, r)
            if block.shared_expert is not None:
                a.insert(0, block.shared_expert.A(target)[0])
                b.insert(0, block.shared_expert.B(target)[0])
            key = f"base_model.model.{info.module(target)}"
            tensors[f"{key}.lora_A.weight"] = torch.cat(a, dim=0).detach()  # (R, in)
            tensors[f"{key}.lora_B.weight"] = torch.cat(b, dim=1).detach()  # (out, R)
    return {key: t.to(dtype or t.dtype).contiguous() for key, t in tensors.items()}


def lora_config(model: Any, base_name: str | None = None):
    """The PEFT LoraConfig every chain's adapter shares."""
    from peft import LoraConfig

    cfg = _mose_config(model)
    parts = 2 if cfg.shared_expert else 1
    modules = [info.module(t) for info, _ in mose_layers(model) for t in cfg.lora_targets]
    return LoraConfig(r=parts * cfg.lora_rank, lora_alpha=parts * cfg.lora_alpha, lora_dropout=0.0,
                      bias="none", target_modules=modules, task_type="CAUSAL_LM",
                      base_model_name_or_path=base_name)


def router_tensors(model: Any) -> dict[str, torch.Tensor]:
    """Every MoSE layer's router: layers.{i}.{weight, bias, input_mean, input_scale}, float32."""
    return {f"layers.{info.layer}.{name}": t.detach().float().contiguous()
            for info, block in mose_layers(model) for name, t in block.router.state_dict().items()}


# --- dense checkpoints -------------------------------------------------------------------------


def dense_config(model: Any):
    """The base architecture's config of a converted model (no `mose`, the base model_type)."""
    data = model.config.to_dict()
    data.pop("mose", None)
    data.pop("model_type", None)
    data["architectures"] = [model.mose_arch.model_class.__name__]
    return model.mose_arch.model_class.config_class.from_dict(data)


def _merged_ffn(block: Any, skill: int | None) -> dict[str, torch.Tensor]:
    """gate_proj / up_proj / down_proj weights of one MoSE layer with `skill`'s deltas merged in
    (skill None: the base FFN, no delta)."""
    if isinstance(block.experts, Experts):  # full experts, no shared expert (checked)
        gate, up = block.experts.gate_up_proj[skill].detach().chunk(2, dim=0)  # (I, H) each
        return {"gate_proj": gate.contiguous(), "up_proj": up.contiguous(),
                "down_proj": block.experts.down_proj[skill].detach().contiguous()}
    weights = {}
    for target, name in PROJECTIONS.items():
        weight = getattr(block.base, name).weight.detach()  # (out, in)
        if skill is not None and target in block.experts.dims:
            delta = block.experts.delta_weight(target, skill).float()
            if block.shared_expert is not None:
                delta = delta + block.shared_expert.delta_weight(target, 0).float()
            weight = (weight.float() + delta).to(weight.dtype)
        weights[name] = weight.contiguous()
    return weights


def dense_model(model: Any, chain: Chain | None = None) -> nn.Module:
    """The converted model as a plain model of its base architecture: every MoSE layer's FFN is
    the base FFN (chain None, LoRA experts only) or the chain's merged FFN. Other weights are the
    converted model's own tensors, shared, not copied."""
    cfg = _mose_config(model)
    state = model.state_dict()
    for info, block in mose_layers(model):
        for key in [k for k in state if k.startswith(info.prefix + ".")]:
            del state[key]
        skill = None if chain is None else _skill_index(cfg, chain, info.level)
        for name, weight in _merged_ffn(block, skill).items():
            state[f"{info.prefix}.{name}.weight"] = weight
    with torch.device("meta"):
        dense = model.mose_arch.model_class(dense_config(model))
    missing, unexpected = dense.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(dense, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ExportError(f"the dense {type(dense).__name__} does not match the converted model's "
                          f"weights: missing {missing}, unexpected {unexpected}")
    for name, buffer in list(dense.named_buffers()):  # non-persistent buffers (rotary inv_freq)
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            dense.get_submodule(owner)._buffers[leaf] = model.get_buffer(name)
    dense.tie_weights()
    return dense.eval()


# --- writing -----------------------------------------------------------------------------------


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` when the block finishes; removed on error."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists already: remove it, choose another --out, or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _save_dense(model: Any, chain: Chain | None, folder: Path, processor: Any,
                dtype: torch.dtype | None = None) -> None:
    dense = dense_model(model, chain)
    # `.to` rebinds the dense model's own parameters: the converted model's tensors stay as they are.
    (dense.to(dtype) if dtype is not None else dense).save_pretrained(folder)
    if processor is not None:
        from mose.models.processor import save_processor

        save_processor(processor, folder)


def export_adapters(model: Any, out: str | Path, chains: Sequence[Chain] | None = None, *,
                    processor: Any = None, with_base: bool = True, base_name: str | None = None,
                    dtype: torch.dtype | None = None, overwrite: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """Write every chain's adapter (all chains unless given), the routers, the base and the
    manifest to `out` (see the module docstring); returns the manifest.

    `base_name` is what each adapter_config.json names as its base (`base_model_name_or_path`,
    which PEFT's AutoPeft classes load): by default the absolute path of OUT/base when it is
    written, else none. `dtype` casts the adapters and the base (default: the model's own);
    the routers stay float32.
    """
    cfg = check_exportable(model)
    chains = all_chains(cfg.taxonomy) if chains is None else list(dict.fromkeys(chains))
    if not chains:
        raise ExportError("no chains to export")
    _check_names(chains)
    out = Path(out)
    if base_name is None and with_base:
        base_name = str((out / BASE).resolve())  # where the rename at the end puts it
    manifest = _manifest(model, cfg, chains, with_base) | {
        "base_model_name_or_path": base_name,
        "dtype": str(dtype or next(model.parameters()).dtype).removeprefix("torch.")}
    with atomic_dir(out, overwrite) as tmp, _progress(progress) as bar:
        save_file(router_tensors(model), str(tmp / ROUTERS))
        if with_base:
            _save_dense(model, None, tmp / BASE, processor, dtype)
        config = lora_config(model, base_name)
        task = bar.add_task("adapters", total=len(chains))
        for chain in chains:
            folder = tmp / ADAPTERS / chain_name(chain)
            folder.mkdir(parents=True)
            config.save_pretrained(str(folder))
            save_file(adapter_tensors(model, chain, dtype), str(folder / ADAPTER_WEIGHTS),
                      metadata={"format": "pt"})
            bar.advance(task)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def export_merged(model: Any, out: str | Path, chain: Chain, *, processor: Any = None,
                  dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """One chain merged into a plain dense checkpoint at `out`, loadable without mose (in `dtype`,
    default the model's own; the merge itself is computed in float32)."""
    cfg = check_exportable(model, merge=True)
    if len(chain) != len(cfg.taxonomy.levels):
        raise ExportError(f"chain {chain} does not name one skill per level {cfg.taxonomy.level_names}")
    with atomic_dir(Path(out), overwrite) as tmp:
        _save_dense(model, tuple(chain), tmp, processor, dtype)
        note = {"format": FORMAT, "version": FORMAT_VERSION, "kind": "merged",
                "chain": dict(zip(cfg.taxonomy.level_names, chain, strict=True)),
                "experts": cfg.experts}
        (tmp / "mose_merged.json").write_text(json.dumps(note, indent=2) + "\n")
    return Path(out)


def _manifest(model: Any, cfg: MoSEConfig, chains: Sequence[Chain], with_base: bool) -> dict[str, Any]:
    names = cfg.taxonomy.level_names
    parts = 2 if cfg.shared_expert else 1
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": "lora-adapters",
        "architecture": model.mose_arch.name,
        "base": BASE if with_base else None,
        "base_config": dense_config(model).to_dict(),
        "mose_config": cfg.to_dict(),
        "taxonomy": cfg.taxonomy.to_dict(),
        "top_k": cfg.top_k,
        "lora": {"r": parts * cfg.lora_rank, "lora_alpha": parts * cfg.lora_alpha,
                 "skill_rank": cfg.lora_rank, "shared_rank": cfg.lora_rank if cfg.shared_expert else 0,
                 "targets": list(cfg.lora_targets)},
        "layers": [{"layer": info.layer, "level": info.level, "modules":
                    [info.module(t) for t in cfg.lora_targets]} for info, _ in mose_layers(model)],
        "routers": ROUTERS,
        "naming": NAME_RULE,
        "chains": [{"name": chain_name(c), "adapter": f"{ADAPTERS}/{chain_name(c)}",
                    "skills": dict(zip(names, c, strict=True))} for c in chains],
    }


def read_manifest(path: str | Path) -> dict[str, Any]:
    """An export's manifest (the folder or the file), checked for the fields `route` reads."""
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ExportError(f"{file}: no manifest (not a `mose export` folder)") from None
    except json.JSONDecodeError as error:
        raise ExportError(f"{file}: not JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ExportError(f"{file}: field 'format' is not {FORMAT!r} (not a mose export manifest)")
    for name in ("chains", "taxonomy"):
        if name not in data:
            raise ExportError(f"{file}: missing field {name!r}")
    return data


# --- routing -----------------------------------------------------------------------------------


def route_records(model: Any, processor: Any, samples: Sequence[Any], *, manifest: Mapping | None = None,
                  batch_size: int = 8, progress: bool = True, source: str = "samples") -> list[dict]:
    """Per sample, the chain the model's routers choose and the adapter it maps to.

    `exact`: see `chain_adapter`. With a manifest, `adapter` is null where that chain was
    not exported.
    """
    from mose.eval.analysis import route_samples

    cfg = _mose_config(model)
    if manifest is not None:
        theirs = manifest["taxonomy"]
        if theirs != json.loads(json.dumps(cfg.taxonomy.to_dict())):
            raise ExportError(f"the manifest's taxonomy {theirs.get('name')!r} is not the model's "
                              f"{cfg.taxonomy.name!r}: this export is of another model")
        exported = {c["name"] for c in manifest["chains"]}
    chains = route_samples(model, processor, samples, batch_size=batch_size, progress=progress,
                           source=source)
    rows = []
    for sample, chain in zip(samples, chains, strict=True):
        name, exact = chain_adapter(cfg, chain)
        rows.append({"id": sample.id, "skill_chain": chain.as_dict(),
                     "adapter": name if manifest is None or name in exported else None,
                     "exact": exact})
    return rows


def chain_adapter(cfg: MoSEConfig, chain: Any) -> tuple[str, bool]:
    """A routed `SkillChain`'s adapter name, and whether that adapter computes what the MoSE
    model does on the sample: top-1 routing, and every MoSE layer of a level chose the chain's
    skill (a level's layers have their own routers; the chain takes their majority)."""
    exact = cfg.top_k == 1 and all(s == c.skill for c in chain.choices for _, s, _ in c.layers)
    return chain_name(list(chain.as_dict().values())), exact


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=not enabled)
