"""Cases a red-team pass over buffer.py and distill.py found: each one a misleading or unhelpful message for an
input a user can give (the programs were run from a shell; these reproduce each case in-process)."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import distill_flags

import distill
from utils.cli import UserError
from utils.io import safe_torch_load
from utils.paths import ensure_output_dir


def test_resume_of_a_json_file_is_not_a_tensor_file_and_is_not_to_be_deleted(tmp_path):
    # `--resume buffer_meta.json` said the JSON was "corrupt ... delete it and create it again".
    meta = tmp_path / "buffer_meta.json"
    meta.write_text('{"dataset": "shapes"}\n')
    with pytest.raises(UserError) as err:
        safe_torch_load(meta, "distilled set")
    message = str(err.value)
    assert str(meta) in message and "not a tensor file" in message and "delete" not in message
    assert meta.read_text() == '{"dataset": "shapes"}\n'


def test_a_truncated_tensor_file_is_still_called_damaged(tmp_path):
    path = tmp_path / "set.pt"
    torch.save({"x": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=r"set\.pt is corrupt, truncated or not a tensor file .*delete it"):
        safe_torch_load(path, "distilled set")


def test_resume_of_a_folder_says_it_is_a_folder(tmp_path):
    # `--resume runs/x` (the save_dir, not a file in it) said "distilled set not found".
    with pytest.raises(UserError, match=rf"distilled set {tmp_path} is a folder, not a file"):
        safe_torch_load(tmp_path, "distilled set")


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_output_folder_that_is_a_broken_link_is_named_as_such(tmp_path, kind):
    # A --save_dir / --buffer_path that is a symbolic-link loop said "cannot be written to (File exists)".
    link = tmp_path / "out"
    if kind == "loop":
        os.symlink(tmp_path / "other", link)
        os.symlink(link, tmp_path / "other")
    else:
        os.symlink(tmp_path / "missing" / "target", link)
    with pytest.raises(UserError) as err:
        ensure_output_dir(link, "--save_dir")
    message = str(err.value)
    assert message.startswith(f"--save_dir {link}: {link} is a symbolic link") and "File exists" not in message


def test_resume_of_a_coreset_names_it_as_a_coreset(tiny_shapes, cache_dir, experts, run4, tmp_path):
    # `--resume` of an evaluate.py coreset said "num_pairs: file has None, this run has 8".
    payload = torch.load(run4 / "distilled_last.pt", weights_only=True)
    del payload["config"]["num_pairs"]  # as evaluate.py writes a coreset: no num_pairs, a coreset source
    payload["config"].update(source="coreset:random", coreset="random")
    coreset = tmp_path / "random_8_seed0.pt"
    torch.save(payload, coreset)
    with pytest.raises(UserError) as err:
        distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path / "out", "--Iteration", "4",
                                   "--resume", str(coreset)))
    message = str(err.value)
    assert message.startswith(f"--resume {coreset} is a coreset:random set written by evaluate.py")
    assert "None" not in message


def test_buffer_mismatch_hint_follows_the_keys_shown(tiny_shapes, cache_dir, experts, tmp_path):
    # A buffer_meta.json lacking its keys was blamed on --image_pretrained (the 4th problem, not shown).
    import json
    import shutil

    folder = tmp_path / "buf" / "shapes" / "convnet" / "minilm"
    shutil.copytree(experts / "shapes" / "convnet" / "minilm", folder)
    (folder / "buffer_meta.json").write_text(json.dumps({"dataset": "shapes"}))
    with pytest.raises(UserError) as err:
        distill.main(distill_flags(tiny_shapes, cache_dir, tmp_path / "buf", tmp_path / "out", "--Iteration", "2"))
    message = str(err.value)
    assert "image_encoder: buffer has None" in message and "--image_pretrained" not in message


def test_a_second_ctrl_c_while_the_program_exits_prints_no_traceback(tmp_path):
    # Ctrl-C twice in quick succession on buffer.py: the second one landed in torch's atexit clean-up and printed
    # "Exception ignored in atexit callback" with a traceback after the one-line "interrupted" message.
    import subprocess
    import sys

    script = tmp_path / "twice.py"
    script.write_text(
        "import atexit, os, signal, time\n"
        "from utils.cli import run_cli\n"
        "def exiting():\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, while the interpreter shuts down\n"
        "    time.sleep(0.2)\n"
        "atexit.register(exiting)\n"
        "def main():\n"
        "    raise KeyboardInterrupt\n"
        "run_cli(main)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130
    assert done.stderr == "interrupted: everything saved so far is complete and reloadable\n"


def test_resuming_a_finished_run_says_nothing_is_left_to_learn(tiny_shapes, cache_dir, experts, run4, tmp_path, capsys):
    # `--resume distilled_last.pt` of a run that reached --Iteration ended "done: 0 iterations", exit 0, and no more.
    last = run4 / "distilled_last.pt"
    assert distill.main(distill_flags(tiny_shapes, cache_dir, experts, tmp_path / "out", "--Iteration", "4",
                                      "--resume", str(last))) == 0
    assert (f"note: --resume {last} is already at --iterations 4: nothing is left to learn; give a larger --iterations "
            f"to continue it\n") in capsys.readouterr().out
