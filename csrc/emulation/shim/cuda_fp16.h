// Emulation shim: see emulation/runtime.h.
#pragma once
#include "emulation/runtime.h"
