// Empty: the emulator defines what the kernels use (ffi/cuda/common/kernel_utils.cuh here).
#pragma once
