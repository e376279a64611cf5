"""The config dataclasses of the jobs: `GenerateConfig` (a chart-QA dataset) here, `eval.config.EvalConfig` (a
benchmark run) and `training.config.TrainConfig` (a fine-tune), all `JobConfig`s. Each field is documented once,
in its `help`, and from the dataclass come the CLI flags (`python -m charts generate`), the YAML file a job is
started from and saved with (`--config job.yaml`, flags override it), and the defaults and help of the tab's form:

    cfg = GenerateConfig(out="workspace/datasets/d", n=200).validate()
    cfg.to_yaml("gen.yaml"); GenerateConfig.from_yaml("gen.yaml") == cfg
    ap = argparse.ArgumentParser(); add_flags(ap, GenerateConfig); cfg = from_flags(GenerateConfig, ap.parse_args())
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .paraphrase import DEFAULT_MODEL
from .questions import FAMILIES
from .spec import KINDS, LOOKS


class ConfigError(ValueError):
    """A config value out of range, an unknown key or name, a missing file: one line that says which."""


def option(default, help: str, *, choices: tuple | None = None, required: bool = False, flag: dict | None = None,
           group: str | None = None):
    """A config field: `help` is its one documentation; `flag` holds argparse keywords for list fields
    (e.g. {"action": "append"} or {"type": csv}); `group` is the section of the flags and form it shows in."""
    meta = {"help": help, "choices": choices, "required": required, "flag": flag or {}, "group": group}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def boolean(value) -> bool:
    """true/yes/on/1 or false/no/off/0 (any case; SageMaker passes "True"): anything else is refused rather
    than read as false."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected true or false, got {value!r}")


class JobConfig:
    """What every job config shares: dict / YAML round trip with one-line errors, and CLI flags.

    `cli` is the command whose --help lists the fields (named when a key is unknown); with `validate_on_init`
    every way a config is made (CLI, YAML, form, launcher, preset, replace) checks it at construction."""

    cli: ClassVar[str] = ""
    validate_on_init: ClassVar[bool] = False

    def __post_init__(self):
        if self.validate_on_init:
            self.validate()

    def validate(self):
        """Raise ConfigError (one line, naming each bad field) unless every value is in range."""
        problems = [p for p in self.problems() if p]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("required") and value in ("", None, []):
                problems.append(f"{f.name} is required")
            choices = f.metadata.get("choices")
            values = value if isinstance(value, list) else [value]
            # None is a choice only of a field whose default is None (unset)
            bad = [v for v in values if choices and v not in choices and not (v is None and _default(f) is None)]
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
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(_mapping(cls, d)) - set(known), key=str)
        if unknown:
            hint = f" (see `{cls.cli} --help`)" if cls.cli else ""
            raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(map(str, unknown))}{hint}")
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
    def from_yaml(cls, path_or_text: str | Path):
        """The config in a YAML file (a Path, or a one-line string that is not "key: value" text) or YAML text."""
        return cls.from_dict(cls.yaml_fields(path_or_text))

    @classmethod
    def yaml_fields(cls, path_or_text: str | Path) -> dict:
        """The mapping in a YAML config file or text, unchecked (flags may still override its values)."""
        import yaml

        source = "config"
        if _looks_like_path(path_or_text):
            path = Path(path_or_text)
            if not path.is_file():
                raise ConfigError(f"no such config file: {path}")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read config file {path}: {e}") from None
            source = f"config file {path}"
        else:
            text = str(path_or_text)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source} is not valid YAML: {' '.join(str(e).split())}") from None
        return {} if data is None else _mapping(cls, data)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def help(cls, name: str) -> str:
        return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


def _mapping(cls, data) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"a config is a mapping of {cls.__name__} fields, got {type(data).__name__} "
                          f"{str(data)[:60]!r}")
    return data


def _looks_like_path(x) -> bool:
    # A file name is one line without a "key: value" pair; YAML text for a config has at least one.
    if isinstance(x, Path):
        return True
    text = str(x).strip()
    return bool(text) and "\n" not in text and ": " not in text and not text.startswith("{")


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _kind(f: dataclasses.Field) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", list: "a list"}.get(type(_default(f)), "text")


def _coerce(f: dataclasses.Field, value):
    """YAML / form / SageMaker values to the field's type ("3" -> 3, "2e-4" -> 0.0002, "a,b" -> ["a", "b"],
    "true" -> True); None stays None except for a bool."""
    default = _default(f)
    if isinstance(default, bool):
        return boolean(value)
    if value is None:
        return None
    if isinstance(default, list):
        return csv(value) if isinstance(value, str) else [str(v) for v in value]
    if isinstance(default, int):
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(value)
        return int(number)
    if isinstance(default, float):
        return float(value)
    if default is None and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, bool):         # YAML's `false` for a field of words ("auto" / "true" / "false")
        return "true" if value else "false"
    return str(value)


def add_flags(parser: argparse.ArgumentParser, cls, skip: tuple = ()) -> None:
    """One flag per field (`--max-new-tokens` for max_new_tokens) with the field's help, plus --config.
    Defaults are left None so that a flag given overrides the config file and a flag left out does not."""
    parser.add_argument("--config", help=f"a {cls.__name__} YAML file (flags given override its values)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = _default(f)
        text = f.metadata["help"] + (f" (default: {default!r})" if default not in ("", None, []) else "")
        kw = {"help": text.replace("%", "%%"), "default": None, **f.metadata["flag"]}     # argparse formats help with %
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif "type" not in kw and "action" not in kw and not isinstance(default, list):
            kw["type"] = type(default) if default is not None else str
        if f.metadata.get("choices") and not isinstance(default, list):
            kw["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def from_flags(cls, args: argparse.Namespace):
    """The config from --config (if given) with every flag given on top, validated."""
    base = cls.yaml_fields(Path(args.config)) if getattr(args, "config", None) else {}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    return cls.from_dict({**base, **given}).validate()


@dataclass
class GenerateConfig(JobConfig):
    cli = "python -m charts generate"
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
