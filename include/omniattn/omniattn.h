// omniattn: one attention operator for every attention variant. Umbrella header.
#pragma once

#include "omniattn/attention.h"
#include "omniattn/kv_cache.h"
#include "omniattn/linear.h"
#include "omniattn/masks.h"
#include "omniattn/merge.h"
#include "omniattn/neighborhood.h"
#include "omniattn/params.h"
#include "omniattn/scores.h"
#include "omniattn/spec.h"
#include "omniattn/tensor.h"
#include "omniattn/version.h"
