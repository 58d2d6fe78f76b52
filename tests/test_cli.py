"""`fastrollout run`: the embedded default job, and a config file that is wrong."""
import json

from fastrollout.cli import main


def test_run_embedded_default(capsys):
    assert main(["run", "--steps", "2", "--tasks", "8", "--repeat", "4", "--eval-tasks", "4",
                 "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["batch_type"], r["batch_id"], r["finished_task_count"]) for r in lines] == [
        ("train", 0, 8), ("train", 1, 8), ("eval", "2/demo", 4)]
    assert lines[0]["metrics"]["experience_pipeline/experience_count"] == 32.0
    assert "eval/demo/accuracy/mean@4" in lines[2]["metrics"]


def test_bad_config_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("explorer:\n  max_timeout: -1\n")
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "explorer.max_timeout" in err and str(path) in err
