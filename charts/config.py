"""Config dataclasses of the jobs that are not training: `GenerateConfig` (a chart-QA dataset) here and
`eval.config.EvalConfig` (a benchmark run). As `training.config.TrainConfig` does for training, each field
is documented once, in its `help`, and from the dataclass come the CLI flags (`python -m charts generate`),
the YAML file a job is started from and saved with (`--config job.yaml`, flags override it), and the
defaults and help of the tab's form:

    cfg = GenerateConfig(out="workspace/datasets/d", n=200).validate()
    cfg.to_yaml("gen.yaml"); GenerateConfig.from_yaml("gen.yaml") == cfg
    ap = argparse.ArgumentParser(); add_flags(ap, GenerateConfig); cfg = from_flags(GenerateConfig, ap.parse_args())
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .paraphrase import DEFAULT_MODEL
from .questions import FAMILIES
from .spec import KINDS, LOOKS


class ConfigError(ValueError):
    """A value out of range or an unknown key: one line that names the field."""


def option(default, help: str, *, choices: tuple | None = None, required: bool = False, flag: dict | None = None):
    """A config field: `help` is its one documentation; `flag` holds argparse keywords for list fields
    (e.g. {"action": "append"} or {"type": csv})."""
    meta = {"help": help, "choices": choices, "required": required, "flag": flag or {}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class JobConfig:
    """What every job config shares: dict / YAML round trip with one-line errors, and CLI flags."""

    def validate(self):
        problems = [p for p in self.problems() if p]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("required") and value in ("", None, []):
                problems.append(f"{f.name} is required")
            choices = f.metadata.get("choices")
            values = value if isinstance(value, list) else [value]
            bad = [v for v in values if choices and v is not None and v not in choices]
            if bad:
                problems.append(f"{f.name}: {bad[0]!r} is not one of {', '.join(map(str, choices))}")
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def problems(self) -> list[str | None]:
        return []

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ConfigError(f"a config is a mapping of {cls.__name__} fields, got {type(d).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(map(str, unknown))}")
        values = {}
        for k, v in d.items():
            try:
                values[k] = _coerce(known[k], v)
            except (TypeError, ValueError):
                raise ConfigError(f"{k}: {v!r} is not {_kind(known[k])}") from None
        return cls(**values)

    def to_yaml(self, path: str | Path | None = None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        if path is not None:
            from .io import atomic_write_text
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path):
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no such config file: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
        return cls.from_dict(data or {})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def help(cls, name: str) -> str:
        return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _kind(f: dataclasses.Field) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", list: "a list"}.get(type(_default(f)), "text")


def _coerce(f: dataclasses.Field, value):
    """YAML / form values to the field's type ("3" -> 3, "a,b" -> ["a", "b"]); None stays None."""
    default = _default(f)
    if value is None:
        return None
    if isinstance(default, bool):
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    if isinstance(default, list):
        return csv(value) if isinstance(value, str) else [str(v) for v in value]
    if isinstance(default, int):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(float(value)) if isinstance(value, str) else int(value)
    if isinstance(default, float):
        return float(value)
    if default is None and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return str(value)


def add_flags(parser: argparse.ArgumentParser, cls, skip: tuple = ()) -> None:
    """One flag per field (`--max-new-tokens` for max_new_tokens) with the field's help, plus --config.
    Defaults are left None so that a flag given overrides the config file and a flag left out does not."""
    parser.add_argument("--config", help=f"a {cls.__name__} YAML file (flags given override its values)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = _default(f)
        kw = {"help": f.metadata["help"] + (f" (default: {default!r})" if default not in ("", None, []) else ""),
              "default": None, **f.metadata["flag"]}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif "type" not in kw and "action" not in kw and not isinstance(default, list):
            kw["type"] = type(default) if default is not None else str
        if f.metadata.get("choices") and not isinstance(default, list):
            kw["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def from_flags(cls, args: argparse.Namespace):
    """The config from --config (if given) with every flag given on top, validated."""
    base = cls.from_yaml(args.config).to_dict() if getattr(args, "config", None) else {}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return cls.from_dict({**base, **given}).validate()


@dataclass
class GenerateConfig(JobConfig):
    out: str = option("", "Dataset folder, e.g. workspace/datasets/NAME.", required=True)
    n: int = option(2000, "Number of charts (images).")
    kinds: list = option(list(KINDS), f"Chart kinds, a comma list from: {','.join(KINDS)}.", choices=KINDS,
                         flag={"type": csv})
    families: list = option(list(FAMILIES), f"Question families, a comma list from: {','.join(FAMILIES)}.",
                            choices=FAMILIES, flag={"type": csv})
    seed: int = option(0, "Random seed: the same seed and settings give the same dataset.")
    split: str = option("0.8,0.1,0.1", "train,val,test fractions (by image).")
    workers: int = option(2, "Rendering processes.")
    qa_per_chart: int = option(3, "Questions kept per chart.")
    multi_turn: bool = option(False, "One multi-turn record per image (all its questions in one conversation).")
    instruct_share: float = option(0.5, "Share of train/val questions ending with the short-answer instruction "
                                         "the benchmark runner appends (0 to 1; test questions stay bare).")
    paraphrase: bool = option(False, "Reword questions through Amazon Bedrock.")
    bedrock_model: str = option(DEFAULT_MODEL, "Bedrock model or inference profile id.")
    bedrock_region: str = option("", "Bedrock region (empty: the AWS default).")
    overwrite: bool = option(False, "Replace a dataset made with other settings.")
    look: str = option("default", "How charts are drawn: default, or demo / demo-easy (square 384 px, large "
                                  "type: the demo model's charts).", choices=tuple(LOOKS))

    def problems(self):
        try:
            split = [float(x) for x in self.split.split(",")]
            bad_split = len(split) != 3 or min(split) < 0 or sum(split) <= 0
        except ValueError:
            bad_split = True
        return [bad_split and f"split {self.split!r}: three non-negative fractions, e.g. 0.8,0.1,0.1",
                self.n < 1 and "n must be at least 1", self.qa_per_chart < 1 and "qa_per_chart must be at least 1",
                self.workers < 1 and "workers must be at least 1",
                not 0 <= self.instruct_share <= 1 and "instruct_share must be between 0 and 1",
                not self.kinds and "choose at least one chart kind",
                not self.families and "choose at least one question family"]

    def generate(self, on_progress=None) -> dict:
        """Run it: `charts.generate` with these settings; returns the manifest."""
        from .dataset import generate
        return generate(self.n, self.kinds, self.seed, self.out, self.workers, on_progress, families=self.families,
                        split=[float(x) for x in self.split.split(",")], multi_turn=self.multi_turn,
                        qa_per_chart=self.qa_per_chart, paraphrase=self.paraphrase,
                        bedrock_model=self.bedrock_model, bedrock_region=self.bedrock_region or None,
                        instruct_share=self.instruct_share, overwrite=self.overwrite, look=self.look)
