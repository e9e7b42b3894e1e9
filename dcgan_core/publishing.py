"""What a new version must satisfy to follow the latest one: the same interface, no worse figures.

Clients and the server treat a model name as a promise (its kind, shapes, latent size, classes);
a version that breaks it belongs under a new name. A version whose figures are worse than the
latest's beyond the noise of those figures is refused unless the operator says it is meant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROTOCOL = "protocol"  # metrics key: {"samples": N, "seed": S}, how the figures were measured
DEFAULT_PROTOCOL = {"samples": 10_000, "seed": 0}


class PublishRefused(ValueError):
    """A version that would break the model's promise or lower its quality, and why."""


class Incompatible(PublishRefused):
    """The candidate differs from the model's versions in kind, shapes, latent size or classes."""


class Worse(PublishRefused):
    """The candidate's figures are worse than the latest version's beyond their noise."""


def protocol_of(metrics: dict[str, Any]) -> dict[str, int]:
    """The protocol of a manifest's figures (the default for manifests that predate recording it:
    their sample count when they state one, seed 0 as dcgan-eval draws)."""
    recorded = metrics.get(PROTOCOL)
    if isinstance(recorded, dict) and {"samples", "seed"} <= recorded.keys():
        return {"samples": int(recorded["samples"]), "seed": int(recorded["seed"])}
    return {**DEFAULT_PROTOCOL, "samples": int(metrics.get("samples", DEFAULT_PROTOCOL["samples"]))}


def interface(manifest: Any) -> dict[str, Any]:
    """What every version of one model must share (a Manifest's fields, by name)."""
    return {
        "kind": manifest.kind,
        "latent size": manifest.latent_size,
        "sample shape": list(manifest.sample_shape),
        "generator input": [manifest.generator.input_name, list(manifest.generator.input_shape)],
        "generator output": [manifest.generator.output_name, list(manifest.generator.output_shape)],
        "discriminator input": [manifest.discriminator.input_name, list(manifest.discriminator.input_shape)],
        "discriminator output": [manifest.discriminator.output_name, list(manifest.discriminator.output_shape)],
        "discriminator source input": manifest.discriminator.source_input,
        "number of classes": manifest.num_classes,
        "class names": list(manifest.class_names),
    }


def check_compatible(latest: Any, candidate: Any) -> None:
    """Raise Incompatible naming each difference between the latest version and the candidate."""
    old, new = interface(latest), interface(candidate)
    differences = [f"{key}: version {latest.version} has {old[key]}, the candidate {new[key]}"
                   for key in old if old[key] != new[key]]
    if differences:
        raise Incompatible(f"model {latest.name!r} cannot take this version (" + "; ".join(differences)
                           + "); publish it under a new model name")


@dataclass(frozen=True)
class Gate:
    """One figure's direction and noise: the spread over sample seeds that bench/fd_over_seeds.py
    measured (bench/results/fd_over_seeds.json), as a share of the figure when ``relative``."""

    higher_is_better: bool
    noise: float
    relative: bool = False

    def worse(self, candidate: float, incumbent: float) -> bool:
        margin = self.noise * abs(incumbent) if self.relative else self.noise
        gap = incumbent - candidate if self.higher_is_better else candidate - incumbent
        return gap > margin


# Measured spreads over 5 seeds (bench/results/fd_over_seeds.json, 10k samples): FD 0.67 of a
# median 2.43 (28%), IS 0.06, consistency 0.002, modes 0, high-quality share 0.004.
GATES = {
    "fd": Gate(higher_is_better=False, noise=0.30, relative=True),
    "is": Gate(higher_is_better=True, noise=0.10),
    "consistency": Gate(higher_is_better=True, noise=0.01),
    "modes_covered": Gate(higher_is_better=True, noise=0.0),
    "high_quality": Gate(higher_is_better=True, noise=0.01),
    # Translation models, on held-out MNIST test digits (training/translation.py): the share whose
    # class survives and PSNR, with margins of the order of their spread between runs' epochs.
    "class_kept": Gate(higher_is_better=True, noise=0.005),
    "psnr": Gate(higher_is_better=True, noise=0.2),
}


def gated(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(metrics[key]) for key in GATES if isinstance(metrics.get(key), (int, float))}


def side_by_side(latest: Any, incumbent: dict[str, Any], candidate: dict[str, Any]) -> str:
    """The gated figures of both, one row each, with the noise allowed."""
    rows = [f"  {'figure':<14} {f'version {latest.version}':>12} {'candidate':>12}  noise allowed"]
    for key in gated(incumbent):
        gate, new = GATES[key], candidate.get(key)
        noise = f"{gate.noise:.0%} of it" if gate.relative else f"{gate.noise:g}"
        rows.append(f"  {key:<14} {incumbent[key]:>12.4g} {'-' if new is None else format(new, '.4g'):>12}  "
                    f"{noise} ({'higher' if gate.higher_is_better else 'lower'} is better)")
    return "\n".join(rows)


def check_quality(latest: Any, incumbent: dict[str, Any], candidate: dict[str, Any]) -> None:
    """Raise Worse when a figure of the latest version is missing from the candidate or worse
    beyond its noise; ``incumbent`` are the latest's figures under the candidate's protocol."""
    old, new = gated(incumbent), gated(candidate)
    if not old:
        return
    if not new:
        raise Worse(f"the candidate has no figures to compare with model {latest.name!r} version {latest.version}'s "
                    f"({', '.join(old)}): dcgan-export measures them; --allow-worse publishes without")
    if protocol_of(incumbent) != protocol_of(candidate):
        raise Worse(f"the candidate's figures ({protocol_of(candidate)}) were not measured like version "
                    f"{latest.version}'s ({protocol_of(incumbent)}); they cannot be compared")
    regressions = [key for key in old if key not in new or GATES[key].worse(new[key], old[key])]
    if regressions:
        raise Worse(f"the candidate is worse than model {latest.name!r} version {latest.version} in "
                    f"{', '.join(regressions)} (same protocol: {protocol_of(candidate)}):\n"
                    + side_by_side(latest, old, new))
