import numpy as np
import pytest

import sampling


def test_inverse_sigmoid_matches_reference_values():
    probs = sampling.teacher_forcing_schedule(100, "inverse_sigmoid")
    assert probs.shape == (100,)
    assert probs[0] == pytest.approx(0.8808, abs=1e-4)
    assert probs[-1] == pytest.approx(0.1235, abs=1e-4)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(np.arange(-2, 2, 4 / 100))))
    assert np.all(np.diff(probs) < 0)


def test_inverse_sigmoid_has_one_value_per_epoch_for_awkward_counts():
    for epochs in (1, 3, 7, 30, 33):
        assert len(sampling.teacher_forcing_schedule(epochs)) == epochs


def test_linear_and_constant():
    np.testing.assert_allclose(sampling.teacher_forcing_schedule(5, "linear"), [1, 0.75, 0.5, 0.25, 0])
    np.testing.assert_allclose(sampling.teacher_forcing_schedule(4, "linear", 1.0, 0.5), [1, 5 / 6, 4 / 6, 0.5])
    np.testing.assert_allclose(sampling.teacher_forcing_schedule(3, "constant", 0.7), [0.7] * 3)


def test_bad_schedule_and_epochs_are_refused():
    with pytest.raises(ValueError, match="schedule"):
        sampling.teacher_forcing_schedule(10, "cosine")
    with pytest.raises(ValueError, match="epochs"):
        sampling.teacher_forcing_schedule(0)


def test_cli_prints_values_and_writes_png(tmp_path, capsys):
    out = tmp_path / "curve.png"
    assert sampling.main(["--epochs", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "epoch    1  teacher_forcing_prob 0.8808" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
