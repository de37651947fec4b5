// The codes of the op's arguments, once: the loss terms (X-macros: the enums
// here, the code tables apl_ops.cpp exports for the test against
// apl_kernels/spec.py, the range checks of apl_op_args.h), the gradient modes,
// the reductions and the probability clamp.  Kept apart from apl_loss_math.h
// so that apl_ops.cpp does not rebuild when the math changes.
#pragma once

namespace apl {

#define APL_ACTIVE_TERMS(X) \
  X(kActiveNone, "none", 0) X(kCE, "ce", 1) X(kFL, "fl", 2) X(kNCE, "nce", 3) X(kNFL, "nfl", 4) X(kGCE, "gce", 5) \
  X(kNGCE, "ngce", 6) X(kECE, "ece", 7) X(kTaylor, "taylor", 8)
#define APL_PASSIVE_TERMS(X) \
  X(kPassiveNone, "none", 0) X(kMAE, "mae", 1) X(kRCE, "rce", 2) X(kNMAE, "nmae", 3) X(kNRCE, "nrce", 4) \
  X(kAGCE, "agce", 5) X(kAUL, "aul", 6) X(kAEL, "ael", 7) X(kNNCE, "nnce", 8) X(kNNFL, "nnfl", 9) X(kAMSE, "amse", 10)
#define APL_TERM_ENUM(id, name, code) id = code,
enum ActiveTerm : int { APL_ACTIVE_TERMS(APL_TERM_ENUM) kActiveEnd };
enum PassiveTerm : int { APL_PASSIVE_TERMS(APL_TERM_ENUM) kPassiveEnd };
#undef APL_TERM_ENUM

enum GradMode : int { kOfficial = 0, kExact = 1 };
enum Reduction : int { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

constexpr double kPMin = 1e-7;  // spec.py's P_MIN: gce, ngce, rce and nrce clamp p to [kPMin, 1]

}  // namespace apl
