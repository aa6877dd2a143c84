"""`PrivacyArguments` on the command line: `transformers.HfArgumentParser` reads it beside
`TrainingArguments`, every field round-trips, bad values are refused, and code can still pass what
the command line cannot (a custom clipping style, an `AdaptiveClipping`, a dict of options)."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import transformers

import bkfx
from bkfx.integrations.transformers import PrivacyArguments


def parse(*argv: str):
    parser = transformers.HfArgumentParser((PrivacyArguments, transformers.TrainingArguments))
    return parser.parse_args_into_dataclasses(args=list(argv))


# every field of PrivacyArguments, a value other than its default: (command-line text, parsed value)
GIVEN = {
    "target_delta": ("2e-6", 2e-6),
    "target_epsilon": ("3.5", 3.5),
    "noise_multiplier": None,  # exclusive with target_epsilon: checked on its own below
    "max_epsilon": ("2.5", 2.5),
    "per_sample_max_grad_norm": ("0.25", 0.25),
    "clipping": ("automatic", "automatic"),
    "style": ("layer-wise", "layer-wise"),
    "max_physical_batch_size": ("16", 16),
    "accountant": ("pld", "pld"),
    "dp_seed": ("7", 7),
    "compile_options": ('{"norm_mode": "ghost", "batch_dim": 0}', {"norm_mode": "ghost", "batch_dim": 0}),
    "adaptive_clipping": ('{"count_noise_multiplier": 10, "target_unclipped_quantile": 0.6}',
                          bkfx.AdaptiveClipping(count_noise_multiplier=10, target_unclipped_quantile=0.6)),
}


def test_every_field_round_trips_beside_training_arguments(tmp_path):
    assert set(GIVEN) == {f.name for f in dataclasses.fields(PrivacyArguments)}  # a new field needs a line here
    argv = [x for name, given in GIVEN.items() if given for x in (f"--{name}", given[0])]
    privacy, training = parse(*argv, "--output_dir", str(tmp_path), "--seed", "3", "--max_grad_norm", "0")
    assert privacy == PrivacyArguments(**{name: given[1] for name, given in GIVEN.items() if given})
    for name, given in GIVEN.items():
        if given:
            assert getattr(privacy, name) == given[1], name
    assert (training.seed, privacy.dp_seed, training.max_grad_norm) == (3, 7, 0)  # no clash between the seeds

    sigma, _ = parse("--target_delta", "1e-5", "--noise-multiplier", "1.5")  # dashes work as in TrainingArguments
    assert (sigma.noise_multiplier, sigma.target_epsilon) == (1.5, None)


def test_defaults_are_the_dataclass_defaults():
    privacy, _ = parse("--target_delta", "1e-5", "--target_epsilon", "3")
    assert privacy == PrivacyArguments(target_delta=1e-5, target_epsilon=3.0)
    assert (privacy.style, privacy.compile_options, privacy.adaptive_clipping, privacy.dp_seed) == (
        "all-layer", {}, None, None)


def test_every_field_has_its_help_on_the_command_line():
    parser = transformers.HfArgumentParser(PrivacyArguments)
    text = " ".join(parser.format_help().split())
    for f in dataclasses.fields(PrivacyArguments):
        assert f.metadata.get("help"), f.name
        assert f"--{f.name}" in text and " ".join(f.metadata["help"].split()[:4]) in text, f.name


@pytest.mark.parametrize("argv", [
    ["--style", "by-row"], ["--accountant", "moments"], ["--clipping", "flat"], ["--target_delta", "small"],
    ["--max_physical_batch_size", "2.5"],
])
def test_values_the_parser_refuses(argv):
    with pytest.raises(SystemExit):  # argparse prints the choices and exits
        parse("--target_delta", "1e-5", "--target_epsilon", "3", *argv)


@pytest.mark.parametrize("argv, match", [
    (["--target_delta", "2"], "target_delta"),
    (["--noise_multiplier", "1"], "exactly one"),
    (["--max_epsilon", "0"], "max_epsilon"),
    (["--compile_options", "[1, 2]"], "compile_options must be a JSON object"),
    (["--compile_options", "{norm_mode: ghost}"], "compile_options must be a JSON object"),
    (["--compile_options", '{"style": "param-wise"}'], "compile_options cannot set"),
    (["--adaptive_clipping", '{"quantile": 0.5}'], "bkfx.AdaptiveClipping"),
    (["--adaptive_clipping", '{"count_noise_multiplier": 1, "target_unclipped_quantile": 2}'], "target_unclipped_quantile"),
])
def test_values_the_arguments_refuse(argv, match):
    with pytest.raises(ValueError, match=match):
        parse("--target_delta", "1e-5", "--target_epsilon", "3", *argv)


def test_code_passes_what_the_command_line_cannot():
    groups = [["a.weight"], ["a.bias"]]
    adaptive = bkfx.AdaptiveClipping(count_noise_multiplier=5)
    args = PrivacyArguments(target_delta=1e-5, noise_multiplier=1.0, style=groups, adaptive_clipping=adaptive,
                            compile_options={"norm_mode": "explicit"})
    assert (args.style, args.adaptive_clipping, args.compile_options) == (groups, adaptive, {"norm_mode": "explicit"})
    assert callable(PrivacyArguments(target_delta=1e-5, noise_multiplier=1.0, style=len).style)
    with pytest.raises(ValueError, match="style must be one of"):
        PrivacyArguments(target_delta=1e-5, noise_multiplier=1.0, style="by-row")
    with pytest.raises(TypeError, match="AdaptiveClipping"):
        PrivacyArguments(target_delta=1e-5, noise_multiplier=1.0, adaptive_clipping={"count_noise_multiplier": 5})


def test_seed_is_the_deprecated_name_of_dp_seed():
    with pytest.warns(DeprecationWarning, match="dp_seed"):
        args = PrivacyArguments(target_delta=1e-5, noise_multiplier=1.0, seed=4)
    assert args.dp_seed == 4 and args == PrivacyArguments(target_delta=1e-5, noise_multiplier=1.0, dp_seed=4)
    with pytest.warns(DeprecationWarning, match="dp_seed"):
        assert args.seed == 4
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="disagree"):
        PrivacyArguments(target_delta=1e-5, noise_multiplier=1.0, seed=4, dp_seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dp_seed alone does not warn, and seed is no field: replace() ignores it
        renewed = dataclasses.replace(PrivacyArguments(target_delta=1e-5, noise_multiplier=1.0, dp_seed=4), dp_seed=5)
    assert renewed.dp_seed == 5
