"""One row of class probabilities from a LightGBM booster, fast enough to run
at every draft depth (the tree drafter serves with it; draft-fit times it)."""

from __future__ import annotations

import ctypes
import threading

import numpy as np


class Predictor:
    """Class probabilities for one row, without ``Booster.predict``'s Python
    overhead: LightGBM's C API single-row fast path (one ctypes call), falling
    back to ``predict(num_threads=1)`` where that is unavailable. Running on
    one thread matters: OpenMP across the cores the model also uses makes a
    single-row predict tens of times slower."""

    def __init__(self, booster, n_features: int, n_classes: int, num_iteration: int = -1):
        self.booster = booster
        self.n_features, self.n_classes = n_features, n_classes
        self._lock = threading.Lock()  # the fast config owns one output buffer
        self._out = np.zeros(n_classes, dtype=np.float64)
        self._fast = None
        self._num_iteration = None if num_iteration < 0 else num_iteration
        try:
            from lightgbm.basic import _LIB, _c_str

            handle = ctypes.c_void_p()
            ret = _LIB.LGBM_BoosterPredictForMatSingleRowFastInit(
                booster._handle, ctypes.c_int(0),  # C_API_PREDICT_NORMAL: probabilities
                ctypes.c_int(0), ctypes.c_int(num_iteration),  # the first num_iteration rounds (-1: all)
                ctypes.c_int(1),  # C_API_DTYPE_FLOAT64
                ctypes.c_int32(n_features), _c_str("num_threads=1"), ctypes.byref(handle))
            if ret == 0:
                self._fast, self._lib = handle, _LIB
                self._out_len = ctypes.c_int64()
                self._out_ptr = self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_double))
        except (ImportError, AttributeError, OSError):
            self._fast = None

    @property
    def fast(self) -> bool:
        return self._fast is not None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float64).reshape(-1)
        if self._fast is None:
            return self.booster.predict(x[None], num_iteration=self._num_iteration, num_threads=1)[0]
        with self._lock:
            ret = self._lib.LGBM_BoosterPredictForMatSingleRowFast(
                self._fast, x.ctypes.data_as(ctypes.c_void_p), ctypes.byref(self._out_len), self._out_ptr)
            if ret != 0:
                raise RuntimeError("LightGBM single-row predict failed")
            return self._out.copy()

    def __del__(self):
        if getattr(self, "_fast", None) is not None:
            try:
                self._lib.LGBM_FastConfigFree(self._fast)
            except Exception:  # interpreter shutdown: the library may be gone already
                pass
            self._fast = None
