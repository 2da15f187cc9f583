"""Online latency predictor: per (worker, workload), milliseconds per step (denoising step or token) from
the job's shape, learned with normalised LMS at two rates mixed (as in DIO: a fast filter, rate 0.1,
weighted 0.8, tracks change; a slow one, rate 0.01, weighted 0.2, keeps the long-run level).
Pure maths here; the worker persists the state in Redis and updates it after every job."""

from __future__ import annotations

from dataclasses import dataclass, field

FAST_RATE, SLOW_RATE = 0.1, 0.01
FAST_WEIGHT, SLOW_WEIGHT = 0.8, 0.2
EPS = 1e-6
PREDICTOR_TTL_S = 7 * 24 * 3600   # a worker's predictor in Redis outlives a week without a write by no more (`Keys.predictor`)


def features(workload: str, params: dict) -> list[float]:
    """[1, size]: diffusion megapixels of the rung; llm the variant's weight size in GB (decode is
    memory-bandwidth bound, so ms/token grows with the bytes streamed)."""
    if workload == "diffusion":
        return [1.0, int(params.get("width", 512)) * int(params.get("height", 512)) / 1e6]
    return [1.0, float(params.get("weights_gb", params.get("weights_mib", 0) / 1024))]


def nlms_step(w: list[float], x: list[float], y: float, rate: float) -> list[float]:
    err = y - sum(wi * xi for wi, xi in zip(w, x, strict=False))
    norm = EPS + sum(xi * xi for xi in x)
    return [wi + rate * err * xi / norm for wi, xi in zip(w, x, strict=False)]


@dataclass
class StepPredictor:
    fast: list[float] = field(default_factory=lambda: [0.0, 0.0])
    slow: list[float] = field(default_factory=lambda: [0.0, 0.0])
    n: int = 0

    def predict_ms(self, x: list[float]) -> float | None:
        """Predicted ms per step, or None before the first observation."""
        if self.n == 0:
            return None
        f = sum(a * b for a, b in zip(self.fast, x, strict=False))
        s = sum(a * b for a, b in zip(self.slow, x, strict=False))
        return max(0.0, FAST_WEIGHT * f + SLOW_WEIGHT * s)

    def update(self, x: list[float], observed_ms: float) -> None:
        if self.n == 0:   # start both filters at the first observation instead of at zero
            scale = observed_ms / sum(xi * xi for xi in x)
            self.fast = [scale * xi for xi in x]
            self.slow = list(self.fast)
        else:
            self.fast = nlms_step(self.fast, x, observed_ms, FAST_RATE)
            self.slow = nlms_step(self.slow, x, observed_ms, SLOW_RATE)
        self.n += 1

    def to_dict(self) -> dict:
        return {"fast": self.fast, "slow": self.slow, "n": self.n}

    @classmethod
    def from_dict(cls, d: dict) -> StepPredictor:
        return cls(list(d["fast"]), list(d["slow"]), int(d["n"]))


def pick_for_deadline(rungs: list, predicted_ms: list[float | None], seconds_left: float) -> int:
    """Index of the best rung whose predicted run time fits the time left (rungs best first); the last
    (cheapest) if none fits; the first if nothing can be predicted yet."""
    for i, ms in enumerate(predicted_ms):
        if ms is None:
            return i
        if ms / 1000 <= seconds_left:
            return i
    return len(rungs) - 1
