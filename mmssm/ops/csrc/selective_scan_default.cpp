// SIMD level "default" of the compiled CPU scan (flags and op namespace: setup.py).
// One file per level so that each gets its own object file.
#include "selective_scan.h"
