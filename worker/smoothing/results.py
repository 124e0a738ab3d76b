"""What CERTIFY, PREDICT and the test at a target radius answer, one row per input, and their run."""

from __future__ import annotations

from dataclasses import Field, asdict, dataclass, field
from typing import Any, ClassVar, Generic, TypeVar


class Answer:
    """What every per-input answer shares: no prediction means the run abstained."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # every answer is a dataclass
    prediction: int | None

    @property
    def abstained(self) -> bool:
        return self.prediction is None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "abstained": self.abstained}


@dataclass
class Certificate(Answer):
    """CERTIFY's answer for one input.

    With probability ≥ 1 − alpha over the sampling, the smoothed classifier predicts
    ``prediction`` everywhere within ℓ₂ distance ``radius`` of the input. ``prediction`` is None
    (and ``radius`` 0) when the run abstains. ``elapsed_s`` is the input's share of the run's
    wall time (inputs share batches). ``votes`` counts the n estimation copies per class (class
    index as text, zero counts left out): they sum to n, and ``n_a`` is the votes of ĉ_A.
    """

    index: int
    prediction: int | None
    radius: float
    p_a_lower: float
    n_a: int
    n: int
    radius_cap: float
    elapsed_s: float
    p_b_upper: float | None = None  # the top2 bound only
    votes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if self.p_b_upper is None:
            del d["p_b_upper"]
        return d


@dataclass
class Prediction(Answer):
    """PREDICT's answer for one input: the class (None on abstain) and the binomial test behind it.

    If the smoothed classifier's top class is c, the probability that ``prediction`` is a class
    other than c is at most alpha. ``votes`` counts the n copies per class (as in :class:`Certificate`);
    ``n_a`` and ``n_b`` are its two largest counts.
    """

    index: int
    prediction: int | None
    p_value: float
    n_a: int
    n_b: int
    n: int
    elapsed_s: float
    votes: dict[str, int] = field(default_factory=dict)


@dataclass
class RadiusDecision(Answer):
    """The answer for one input at a target radius r.

    ``certified_at_r``: the smoothed classifier predicts ``prediction`` within radius r of the
    input, wrong with probability ≤ alpha. ``p_a_lower`` is a lower bound on p_A valid at the
    stopping time (same alpha, the same event), and ``radius`` = σ·Φ⁻¹(p_a_lower) the certificate
    it implies (0 and ``prediction`` None when p_a_lower ≤ ½). ``samples_used`` counts the n0
    selection draws and the ``n`` test draws; ``reason`` says why the run stopped.
    """

    index: int
    prediction: int | None
    certified_at_r: bool
    target_radius: float
    radius: float
    p_a_lower: float
    n_a: int
    n: int
    samples_used: int
    reason: str
    elapsed_s: float


A = TypeVar("A", bound=Answer)


@dataclass
class Run(Generic[A]):
    """Results of one call, in input order, and the provenance that makes them reproducible."""

    results: list[A]
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"results": [r.to_dict() for r in self.results], "provenance": self.provenance}
