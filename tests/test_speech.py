"""Speech helpers (lowbit_zoo.speech) and dynamic int8 LSTM on real synthesized speech."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import lowbit
from helpers import op_counts, rel_rms
from lowbit import Recipe, Scheme
from lowbit_zoo import speech as sp


@pytest.fixture
def espeak_ng() -> str:
    """Debian's espeak-ng, which `make test` installs (`make speech`): missing is a failure, not a skip."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.fail("espeak-ng is not installed: run `make speech` (Debian package espeak-ng)")
    return exe


needs_espeak = pytest.mark.usefixtures("espeak_ng")


def test_mel_filterbank_covers_the_band_with_triangles():
    bank = sp.mel_filterbank(40, 512)
    assert bank.shape == (40, 257) and bank.min() >= 0 and bank.max() <= 1
    peaks = bank.argmax(axis=1)
    assert np.all(np.diff(peaks) >= 0) and peaks[0] < peaks[-1]  # ordered low to high
    freqs = np.linspace(0, sp.RATE / 2, 257)
    inside = (freqs > 100) & (freqs < 7000)
    assert np.all(bank[:, inside].sum(axis=0) > 0.3)  # no holes inside the band


def test_log_mel_finds_a_tone_in_the_right_band():
    t = np.arange(sp.RATE) / sp.RATE
    low, high = np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 3000 * t)
    f = sp.log_mel(np.stack([low, high]).astype(np.float32))
    assert f.shape == (2, 49, 40)
    assert f[0].mean(axis=0).argmax() < f[1].mean(axis=0).argmax()


def test_split_cuts_at_the_long_pauses_only():
    r = np.random.default_rng(0)
    gap = np.zeros(int(0.5 * sp.ESPEAK_RATE), np.float32)
    short = np.zeros(int(0.05 * sp.ESPEAK_RATE), np.float32)  # a stop closure inside a word
    word = lambda n: (0.3 * r.standard_normal(n)).astype(np.float32)  # noqa: E731
    x = np.concatenate([word(4000), short, word(3000), gap, word(5000), gap, word(4500)])
    parts = sp._split(x, 3)
    assert parts is not None and [len(p) for p in parts][1:] == [5000, 4500]
    assert sp._split(x, 4) is None  # a wrong count is noticed, not guessed


def test_mix_sets_the_signal_to_noise_ratio():
    r = np.random.default_rng(1)
    speech = np.zeros(sp.RATE, np.float32)
    speech[4000:8000] = r.standard_normal(4000).astype(np.float32)
    noise = sp.colored_noise(r, sp.RATE, "pink")
    out = sp.mix(speech, noise, 10.0)
    added = out - speech
    assert abs(10 * np.log10(np.mean(speech[4000:8000] ** 2) / np.mean(added**2)) - 10.0) < 0.05


@pytest.mark.slow
@needs_espeak
def test_lstm_trained_on_espeak_words_keeps_its_accuracy_in_dynamic_int8():
    """4 words x 48 training speakers -> small LSTM; 6 held-out speakers (unseen variants and accents) at two speeds."""
    import torch

    from lowbit.runtimes.ort import session
    from lowbit.torch.onnx_export import module_to_onnx

    words = ["yes", "no", "stop", "go"]
    variants = sp.variants()
    r = np.random.default_rng(0)
    picked = [str(v) for v in r.permutation(variants)[:15]]
    train_takes = [
        sp.Take(v, var, int(r.integers(130, 200)), int(r.integers(30, 70)))
        for v in ("en-us", "en", "en-gb-x-rp", "en-us-nyc")
        for var in picked[:12]
    ]
    test_takes = [
        sp.Take(v, var, speed, 50) for v in ("en-gb-scotland", "en-029") for var in picked[12:] for speed in (140, 180)
    ]

    def features(takes, seed):
        rng = np.random.default_rng(seed)
        audio, labels = [], []
        for take in takes:
            clips = sp.synthesize(take, words)
            assert len(clips) == len(words)
            for k, c in enumerate(clips):
                assert 0.08 * sp.RATE < len(c) < 1.2 * sp.RATE  # a word, not silence or a run-on
                noisy = sp.mix(sp.place(c, rng), sp.colored_noise(rng, sp.RATE, "pink"), float(rng.uniform(5, 20)))
                audio.append(noisy)
                labels.append(k)
        return sp.log_mel(np.stack(audio)), np.array(labels)

    x_tr, y_tr = features(train_takes, 1)
    x_te, y_te = features(test_takes, 2)
    mean, std = x_tr.mean(axis=(0, 1)), x_tr.std(axis=(0, 1)) + 1e-6
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(40, 48, batch_first=True)
            self.fc = torch.nn.Linear(48, len(words))

        def forward(self, x):
            y, _ = self.lstm(x)
            return self.fc(y.mean(dim=1))

    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(80):
        loss = torch.nn.functional.cross_entropy(net(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    float_model = module_to_onnx(net, (torch.from_numpy(x_te[:1]),))
    res = lowbit.quantize(float_model, recipe=Recipe(default=Scheme(mode="dynamic")), progress=False)
    assert op_counts(res.model)["DynamicQuantizeLSTM"] == 1
    ref = session(float_model).run(None, {"x": x_te})[0]
    got = session(res.model).run(None, {"x": x_te})[0]
    float_acc, int8_acc = np.mean(ref.argmax(1) == y_te), np.mean(got.argmax(1) == y_te)
    assert float_acc >= 0.7, f"float model only {float_acc:.2f} on held-out speakers (chance 0.25)"
    assert int8_acc >= float_acc - 0.06 and np.mean(ref.argmax(1) == got.argmax(1)) >= 0.9
    assert rel_rms(ref, got) < 0.05
