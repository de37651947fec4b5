// cuda_emu stub: the CUDA runtime is the emulator's.
#pragma once
#include "../cuda_emu.h"
