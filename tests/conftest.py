"""Session set-up: corelm's C++ kernels are built (or found) before any test makes a layer, so
every quantized layer in the suite runs on them (``make test`` builds them in its set-up step)."""

from corelm import kernels

kernels.load()
