"""store/kernel_load.py: kernel.h5 files written by hand (format 2 factors, format 1 dense
Grams) read into transforms that equal numpy's (G + λI)⁻¹ q, and every bad file refused with
the command that repairs it."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from gradindex.errors import IndexStateError
from gradindex.store.kernel_load import DenseKernel, load_kernel
from gradindex.store.layout import KERNEL

C, D, LAMS = 2, 5, [0.3, 2.0]


def _grams(seed=0):
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(C, 9, D))  # 9 rows per checkpoint, full rank d = 5
    return np.einsum("cnd,cne->cde", phi, phi)  # [C, d, d]


def _manifest(**extra):
    m = {"kernel": {"lambda": LAMS}, "checkpoints": [{}, {}], "dim": C * D, "num_rows": 9}
    return {**m, "build_id": "b1", **extra}


def _write(folder, datasets, build_id="b1"):
    with h5py.File(folder / KERNEL, "w") as f:
        f.attrs["build_id"] = build_id
        for name, value in datasets.items():
            f[name] = value


def _factors(gram):
    eig, basis = np.linalg.eigh(gram)  # [C, d], [C, d, d]
    return {"basis": basis, "eigenvalues": np.maximum(eig, 0), "tail": np.zeros(C)}


def _want(gram, q, lams):
    q = q.reshape(len(q), C, D)
    out = [np.linalg.solve(gram[c] + lams[c] * np.eye(D), q[:, c].T).T for c in range(C)]
    return np.stack(out, 1).reshape(len(q), C * D)


@pytest.mark.parametrize("fmt", (1, 2))
def test_both_formats_give_the_exact_kernel_transform(tmp_path, fmt):
    gram = _grams()
    _write(tmp_path, {"gram": gram} if fmt == 1 else _factors(gram))
    kernel = load_kernel(tmp_path, _manifest(), "tracin")
    assert isinstance(kernel, DenseKernel) == (fmt == 1)
    q = np.random.default_rng(1).normal(size=(3, C * D)).astype(np.float32)
    np.testing.assert_allclose(kernel.transform(q), _want(gram, q, LAMS), rtol=2e-4, atol=1e-6)
    other = [1.5, 0.1]  # any λ without refactoring
    np.testing.assert_allclose(
        kernel.transform(q, other), _want(gram, q, other), rtol=2e-4, atol=1e-6
    )


def test_the_retrac_rows_have_their_own_datasets_and_lambdas(tmp_path):
    gram = _grams(2)
    _write(tmp_path, {f"{k}_retrac": v for k, v in _factors(gram).items()})
    manifest = _manifest(kernel={"lambda_retrac": [1.0, 1.0]})
    q = np.ones((1, C * D), np.float32)
    got = load_kernel(tmp_path, manifest, "retrac").transform(q)
    np.testing.assert_allclose(got, _want(gram, q, [1.0, 1.0]), rtol=2e-4, atol=1e-6)
    with pytest.raises(IndexStateError, match="no kernel of its tracin rows .* 'trak'"):
        load_kernel(tmp_path, manifest, "tracin")


def _refused(folder, manifest, match):
    with pytest.raises(IndexStateError, match=match) as err:
        load_kernel(folder, manifest, "tracin")
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_kernel_files_are_refused_naming_the_repair(tmp_path):
    fix = f"recompute it with: gradindex kernel {tmp_path}"
    good = _factors(_grams())
    _refused(tmp_path, _manifest(kernel={"skipped": "too wide"}), "has no kernel: too wide")
    _refused(tmp_path, _manifest(), "no kernel of its tracin rows")  # no file
    _write(tmp_path, good, build_id="other")
    assert fix in _refused(tmp_path, _manifest(), "build id other but the manifest's is b1")
    _write(tmp_path, good)
    size = (tmp_path / KERNEL).stat().st_size
    _refused(tmp_path, _manifest(files={KERNEL: {"bytes": size + 1}}), f"{size} bytes but")
    _write(tmp_path, {**good, "eigenvalues": good["eigenvalues"][:, :3]})
    _refused(tmp_path, _manifest(), r"eigenvalues declares shape \(2, 3\)")
    _write(tmp_path, {**good, "basis": np.zeros((C, D, 7))})  # rank above min(N, d)
    _refused(tmp_path, _manifest(), "basis declares shape")
    _write(tmp_path, {**good, "tail": np.array([0.0, -1.0])})
    _refused(tmp_path, _manifest(), "not finite or negative")
    _write(tmp_path, {"gram": np.zeros((C, D, 4))})
    _refused(tmp_path, _manifest(), r"gram declares shape \(2, 5, 4\)")
    (tmp_path / KERNEL).write_bytes(b"not hdf5 at all")
    _refused(tmp_path, _manifest(), "unreadable")
