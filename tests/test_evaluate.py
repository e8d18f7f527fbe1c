"""evaluate.py on the tiny data set: JSON output, coresets as set files, one code path, bad inputs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_flags

import evaluate
from data.distilled_set import load_distilled_set, save_distilled_set
from utils.cli import UserError, user_message

METRICS = {"img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10", "img_r_mean", "txt_r_mean", "r_mean"}
QUICK = ("--num_eval", "2", "--epoch_eval_train", "2", "--batch_train", "4")


def run(tiny_shapes, cache_dir, *extra) -> int:
    return evaluate.main(tiny_flags(tiny_shapes, cache_dir, *QUICK, *extra))


def coreset(tiny_shapes, cache_dir, experts, tmp_path, method, n, *extra):
    out = tmp_path / f"{method}.json"
    flags = ["--coreset", method, "--num_queries", str(n), "--buffer_path", str(experts),
             "--coreset_file", str(tmp_path / f"{method}.pt"), "--out", str(out), *extra]
    assert run(tiny_shapes, cache_dir, *flags) == 0
    return load_distilled_set(tmp_path / f"{method}.pt"), json.loads(out.read_text())


@pytest.mark.parametrize("method", ["random", "herding", "kcenter", "forgetting"])
def test_coresets_are_seeded_distinct_and_saved_as_set_files(method, tiny_shapes, cache_dir, experts, tmp_path):
    first, report = coreset(tiny_shapes, cache_dir, experts, tmp_path / "a", method, 12)
    again, _ = coreset(tiny_shapes, cache_dir, experts, tmp_path / "b", method, 12)
    other, _ = coreset(tiny_shapes, cache_dir, experts, tmp_path / "c", method, 12, "--seed", "1")
    chosen = first["caption_indices"]
    assert len(chosen) == 12 and len(set(chosen.tolist())) == 12
    assert torch.equal(chosen, again["caption_indices"]) and torch.equal(first["image_syn"], again["image_syn"])
    if method in ("random", "kcenter", "forgetting"):  # herding has no randomness given the expert
        assert not torch.equal(chosen, other["caption_indices"])
    assert first["image_syn"].shape == (12, 3, 16, 16) and first["text_syn"].shape == (12, 384)
    assert first["config"]["source"] == f"coreset:{method}" and report["label"] == f"coreset:{method}-12"
    if method in ("herding", "kcenter"):
        assert first["config"]["expert_used"]["epoch"] == 3


def test_forgetting_counts_are_shared_by_coreset_sizes(tiny_shapes, cache_dir, experts, tmp_path, capsys):
    small, _ = coreset(tiny_shapes, cache_dir, experts, tmp_path, "forgetting", 6)
    (tmp_path / "forgetting.pt").unlink()
    large, _ = coreset(tiny_shapes, cache_dir, experts, tmp_path, "forgetting", 12)
    assert "reusing the forgetting counts" in capsys.readouterr().out
    assert torch.equal(large["caption_indices"][:6], small["caption_indices"])  # one ranking, two cut-offs
    coreset(tiny_shapes, cache_dir, experts, tmp_path, "forgetting", 12, "--forgetting_epochs", "3")
    assert "reusing the forgetting counts" not in capsys.readouterr().out



@pytest.mark.parametrize("damage", [
    lambda saved: {**saved, "events": saved["events"][:3]},                      # another length
    lambda saved: {**saved, "events": saved["events"].float() * float("nan")},  # not whole counts
    lambda saved: {**saved, "ever_learned": saved["ever_learned"].long()},      # flags of another type
])  # (a file without counts at all is not evaluate.py's: refused, never replaced; tests/test_reliability_outputs.py)
def test_damaged_forgetting_counts_are_counted_again(tiny_shapes, cache_dir, experts, tmp_path, capsys, damage):
    first, _ = coreset(tiny_shapes, cache_dir, experts, tmp_path, "forgetting", 6)
    counts = tmp_path / "forgetting_counts_seed0.pt"
    torch.save(damage(torch.load(counts, weights_only=True)), counts)
    (tmp_path / "forgetting.pt").unlink()
    capsys.readouterr()
    again, _ = coreset(tiny_shapes, cache_dir, experts, tmp_path, "forgetting", 6)
    out = capsys.readouterr().out
    assert f"note: the forgetting counts in {counts} are damaged" in out and "reusing" not in out
    assert torch.equal(again["caption_indices"], first["caption_indices"])

def test_json_has_every_metric_with_runs_and_population_std(tiny_shapes, cache_dir, experts, tmp_path):
    _, report = coreset(tiny_shapes, cache_dir, experts, tmp_path, "random", 10)
    assert set(report["metrics"]) == METRICS
    for entry in report["metrics"].values():
        runs = entry["runs"]
        assert len(runs) == 2
        mean = sum(runs) / 2
        assert entry["mean"] == pytest.approx(mean) and entry["std"] == pytest.approx(math.sqrt(
            sum((r - mean) ** 2 for r in runs) / 2))
    config = report["config"]
    assert config["num_eval"] == 2 and config["epoch_eval_train"] == 2 and config["lr_used"] == 0.1
    assert config["set_size"] == 10 and config["dataset"] == "shapes" and config["text_identity"].startswith("minilm")
    assert "--coreset" in config["command"]


def test_buffers_without_a_training_pair_count_still_serve(tiny_shapes, cache_dir, experts, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(experts / "shapes" / "convnet" / "minilm", old)
    meta = json.loads((old / "buffer_meta.json").read_text())
    del meta["train_pairs"]  # as buffer.py wrote it before the key existed
    (old / "buffer_meta.json").write_text(json.dumps(meta))
    chosen, _ = coreset(tiny_shapes, cache_dir, old, tmp_path, "kcenter", 5)
    assert len(chosen["caption_indices"]) == 5


@pytest.mark.parametrize("method", ["random", "kcenter"])
def test_a_saved_coreset_is_reused_and_evaluates_like_a_distilled_set(method, tiny_shapes, cache_dir, experts,
                                                                      tmp_path, capsys):
    _, by_coreset = coreset(tiny_shapes, cache_dir, experts, tmp_path, method, 10)
    _, again = coreset(tiny_shapes, cache_dir, experts, tmp_path, method, 10, "--forgetting_lr_txt", "0.3")
    assert f"reusing the {method} coreset" in capsys.readouterr().out  # that lr does not enter the selection
    assert again["metrics"] == by_coreset["metrics"]
    out = tmp_path / "as_distilled.json"
    # Only the file: every setting comes from it, as for a distilled set.
    assert evaluate.main(["--distilled", str(tmp_path / f"{method}.pt"), "--num_workers", "0", "--progress", "False",
                          "--wandb_mode", "disabled", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"] == by_coreset["metrics"]
    coreset(tiny_shapes, cache_dir, experts, tmp_path, method, 10, "--seed", "5")
    assert "reusing" not in capsys.readouterr().out


def test_evaluate_reproduces_the_evaluation_distill_stored(run4, tmp_path):
    # distill.py seeds the models of its evaluation at iteration i with seed + 1_000_003 + i.
    path = run4 / "distilled_000004.pt"
    payload = load_distilled_set(path)
    out = tmp_path / "eval.json"
    assert evaluate.main(["--distilled", str(path), "--seed", str(1_000_003 + 4), "--progress", "False",
                          "--wandb_mode", "disabled", "--num_workers", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    # The same models, tested on the selection split (what distill.py stores) and on the test split (reported).
    assert report["selection_split"] == "val" and report["selection_metrics"] == payload["metrics"]
    assert report["split"] == "test" and report["metrics"] != payload["metrics"]
    assert report["config"]["lr_used"] == payload["syn_lr_img"] and report["config"]["image_encoder"] == "convnet"
    assert report["config"]["num_eval"] == 2 and report["config"]["eval_batch"] == 4  # from the file


def test_flags_override_the_file_and_cross_architecture_runs(run4, tmp_path, capsys):
    path = run4 / "distilled_000004.pt"
    out = tmp_path / "eval.json"
    assert evaluate.main(["--distilled", str(path), "--num_eval", "1", "--eval_image_encoder", "convnet_w32",
                          "--lr_eval", "0.05", "--progress", "False", "--wandb_mode", "disabled",
                          "--num_workers", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["image_encoder"] == "convnet_w32" and report["config"]["image_encoder_of_set"] == "convnet"
    assert report["config"]["lr_used"] == 0.05 and len(report["metrics"]["r_mean"]["runs"]) == 1
    assert "on convnet_w32" in report["label"]


def test_eval_image_size_trains_on_the_sets_pixels_averaged_down(run4, tmp_path, monkeypatch):
    from data.transforms import resize_images
    from evaluation import set_files

    path = run4 / "distilled_000004.pt"
    images = load_distilled_set(path)["image_syn"]  # 16 px
    # a whole factor: each output pixel is the mean of its 2x2 block (an independent computation)
    blocks = images.reshape(*images.shape[:2], 8, 2, 8, 2).mean(dim=(3, 5))
    assert torch.allclose(resize_images(images, 8), blocks, atol=1e-6)
    assert resize_images(images, 16) is images and resize_images(images, 24).shape[-1] == 24
    seen = {}
    original = set_files.set_inputs

    def spy(model_settings, payload, set_path, model, device, resize=False):
        found = original(model_settings, payload, set_path, model, device, resize=resize)
        seen.update(found, size=model_settings.image_size)
        return found

    monkeypatch.setattr(set_files, "set_inputs", spy)
    out = tmp_path / "eval.json"
    assert evaluate.main(["--distilled", str(path), "--num_eval", "1", "--eval_image_encoder", "convnet_w32",
                          "--eval_image_size", "8", "--lr_eval", "0.05", "--progress", "False", "--wandb_mode",
                          "disabled", "--num_workers", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["image_size"] == 8 and report["label"].endswith("on convnet_w32 at 8 px")
    assert seen["size"] == 8 and torch.allclose(seen["images"], blocks, atol=1e-6)  # (the set is CLIP-normalised)
    with pytest.raises(UserError, match=r"--eval_image_size resizes the pixels of a --distilled set.*--image_size"):
        evaluate.main(["--full", "--eval_image_size", "8"])
    with pytest.raises(UserError) as caught:
        evaluate.main(["--distilled", str(path), "--eval_image_encoder", "convnet_w32", "--eval_image_size", "12"])
    assert user_message(caught.value).startswith("--eval_image_size: image encoder convnet_w32 needs an image size "
                                                 "divisible by 8, got 12")
    with pytest.raises(UserError, match=r"the set's images are 16x16 px but --image_size is 8.*--eval_image_size 8"):
        evaluate.main(["--distilled", str(path), "--image_size", "8", "--num_eval", "1", "--progress", "False",
                       "--wandb_mode", "disabled", "--num_workers", "0"])


def test_full_data_training(tiny_shapes, cache_dir, tmp_path):
    out = tmp_path / "full.json"
    assert run(tiny_shapes, cache_dir, "--full", "--out", str(out)) == 0
    report = json.loads(out.read_text())
    assert report["label"] == "full-200" and set(report["metrics"]) == METRICS
    assert report["config"]["set_size"] == 200 and report["config"]["lr_used"] == 0.1


def test_bad_inputs_get_clear_messages(tiny_shapes, cache_dir, experts, tmp_path, run4):
    def run(*flags):  # the coreset file in tmp_path: its folder is made before the inputs are judged
        extra = ("--coreset_file", str(tmp_path / "c.pt")) if "--coreset" in flags else ()
        return evaluate.main(tiny_flags(tiny_shapes, cache_dir, *QUICK, *flags, *extra))

    with pytest.raises(UserError, match="not found"):
        run("--distilled", str(tmp_path / "missing.pt"))
    torch.save({"image_syn": torch.zeros(2, 3, 16, 16)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a vl-distill distilled set"):
        run("--distilled", str(tmp_path / "other.pt"))
    with pytest.raises(UserError, match="larger than the 200 training pairs"):
        run("--coreset", "random", "--num_queries", "201")
    with pytest.raises(UserError, match="needs --coreset_size"):
        run("--coreset", "random")
    with pytest.raises(UserError, match="--forgetting_epochs must be at least 2"):
        run("--coreset", "forgetting", "--num_queries", "4", "--forgetting_epochs", "1")
    with pytest.raises(UserError, match="no experts in"):
        run("--coreset", "herding", "--num_queries", "4", "--buffer_path", str(tmp_path))
    with pytest.raises(UserError, match="train_pairs: buffer has 200, this run asks for 50"):
        run("--coreset", "kcenter", "--num_queries", "4", "--buffer_path", str(experts),
            "--max_train_images", "10")
    with pytest.raises(UserError, match="images are 16x16 px but --image_size is 32"):
        evaluate.main(["--distilled", str(run4 / "distilled_last.pt"), "--image_size", "32"])
    with pytest.raises(UserError, match="image encoder vit needs an image size divisible by 16, got 12") as caught:
        payload = load_distilled_set(run4 / "distilled_last.pt")
        save_distilled_set(tmp_path / "small.pt", payload["image_syn"][:, :, :12, :12], payload["text_syn"], 0.1, 0.1,
                           0, {**payload["config"], "image_size": 12})
        evaluate.main(["--distilled", str(tmp_path / "small.pt"), "--eval_image_encoder", "vit",
                       "--image_pretrained", "False"])
    assert user_message(caught.value).startswith("--eval_image_encoder: image encoder vit needs an image size")
    with pytest.raises(UserError, match="invalid choice: 'resnet_9000'"):
        evaluate.main(["--distilled", str(run4 / "distilled_last.pt"), "--eval_image_encoder", "resnet_9000"])
    with pytest.raises(UserError, match="exactly one of"):
        evaluate.main(["--distilled", "x.pt", "--full"])  # two things to evaluate at once


def test_unknown_encoder_message_names_the_choices(capsys):
    with pytest.raises(UserError, match=r"invalid choice: 'resnet_9000' \(choose from 'nfnet'"):
        evaluate.main(["--full", "--eval_image_encoder", "resnet_9000"])


def test_help_lists_the_modes(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--distilled", "--coreset", "--full", "--num_queries", "--eval_image_encoder", "--out", "--lr_eval"):
        assert flag in text


def test_evaluation_models_never_start_from_an_experts_initialisation(tiny_shapes, cache_dir, experts, monkeypatch):
    """Expert n starts from seed n (buffer.py, --seed 0); evaluation model k must not (utils/evaluation.py)."""
    from experts.files import load_expert_weights
    from networks import build_model
    from evaluation import protocol as evaluation
    from experts.files import read_metadata
    from utils.device import seed_everything

    from settings import programs

    settings = programs.from_namespace("evaluate", evaluate.parse_args(tiny_flags(
        tiny_shapes, cache_dir, "--coreset", "random", "--num_queries", "4", "--epoch_eval_train", "1"))[0])
    directory = next(experts.glob("**/buffer_meta.json")).parent
    meta = read_metadata(directory)

    def initial(seed=None, number=None):
        if number is not None:
            model = build_model(settings.model, meta["text_dim"])
            load_expert_weights(model, directory, meta, number, epoch=0)
        else:
            seed_everything(seed)
            model = build_model(settings.model, meta["text_dim"])
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    expert0 = initial(number=0)
    assert torch.equal(initial(seed=0), expert0)  # seed 0 is expert 0's initialisation ...
    captured = []
    monkeypatch.setattr(evaluation, "train_one_epoch", lambda model, *a, **k: captured.append(
        torch.cat([p.detach().reshape(-1) for p in model.parameters()])))
    evaluation.train_fresh_model(settings.model, settings.protocol, None, 0.1, meta["text_dim"], torch.device("cpu"), seed=0)
    assert not torch.equal(captured[0], expert0)  # ... but evaluation model 0 starts elsewhere
    assert not torch.equal(captured[0], initial(number=1))
