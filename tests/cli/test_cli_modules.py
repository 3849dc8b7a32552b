"""The cli package's modules on their own: the spec the build options make (a --config file
overridden by given options, each option's text parsed), JSON of numpy values, and every command
function of the command modules attached to the group under its name."""

from __future__ import annotations

import json

import click
import numpy as np
import pytest

from gradindex.cli import app_commands, index_commands, query_commands
from gradindex.cli.main import main
from gradindex.cli.options import data_kwargs, spec_from_options
from gradindex.cli.output import json_default
from gradindex.errors import SpecError
from gradindex.spec import BuildSpec


def test_given_options_override_the_config_file_and_unset_ones_do_not(tmp_path):
    config = tmp_path / "spec.json"
    config.write_text(json.dumps({"proj_dim": 256, "noise_draws": 3, "seed": 7}))
    options = {"proj_dim": 64, "noise_draws": None, "timesteps": "10,500,900", "params": ()}
    spec = spec_from_options(str(config), options)
    expected = BuildSpec(proj_dim=64, noise_draws=3, seed=7, timesteps=[10, 500, 900])
    assert spec == expected
    assert options == {}  # every spec field popped, the command's own keywords left


def test_snr_gamma_alone_means_the_scripts_min_snr_weighting():
    spec = spec_from_options(None, {"snr_gamma": 5.0})
    assert (spec.snr_weighting, spec.snr_gamma) == ("min_snr", 5.0)
    assert spec_from_options(None, {"timesteps": "8"}).timesteps == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.5,x", "--checkpoint-weights '0.5,x': give comma-separated numbers or 'auto'"),
    ],
)
def test_bad_checkpoint_weights_name_the_option(text, message):
    with pytest.raises(SpecError) as err:
        spec_from_options(None, {"checkpoint_weights": text})
    assert str(err.value) == message


def test_a_config_field_of_the_wrong_type_is_named(tmp_path):
    config = tmp_path / "spec.json"
    config.write_text(json.dumps({"proj_dim": "many"}))
    with pytest.raises(SpecError, match=r"--config .*spec.json: .*proj_dim"):
        spec_from_options(str(config), {})


def test_data_kwargs_keep_only_given_reading_options():
    names = ("image_column", "caption_column", "label_column", "id_column", "split")
    options = {**dict.fromkeys(names), "image_column": "img", "on_error": "raise", "k": 3}
    assert data_kwargs(dict(options, on_error="skip"))["on_error"] == "skip"
    assert data_kwargs(options) == {"image_column": "img"}  # None and the default left out
    assert options == {"k": 3}  # the reading options popped, the command's own left


def test_json_default_writes_numpy_values_as_plain_json():
    record = {"a": np.float32(0.5), "b": np.arange(3, dtype=np.int64), "c": np.bool_(True)}
    assert json.loads(json.dumps(record, default=json_default)) == {
        "a": 0.5,
        "b": [0, 1, 2],
        "c": True,
    }


def test_every_command_of_the_command_modules_is_attached_to_the_group():
    defined = {
        cmd.name
        for module in (app_commands, index_commands, query_commands)
        for cmd in vars(module).values()
        if isinstance(cmd, click.Command)
    }
    assert defined == {
        *("build", "add", "merge", "kernel", "factors"),
        *("query", "info", "report"),
        *("export", "serve", "demo"),
    }
    assert set(main.commands) == defined


def test_ctrl_c_while_the_commands_load_is_one_line():
    """Session 14 probe: Ctrl-C in the first seconds of any command (while torch loads, before
    the group's error boundary exists) printed a long KeyboardInterrupt traceback."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "class Stop:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'gradindex.cli.index_commands':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Stop())\n"
        "from gradindex.cli.main import main\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr == "Error: interrupted before the command started; nothing was written\n"
