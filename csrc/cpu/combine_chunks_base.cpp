// The chunk loops for the compiler's default instruction set (always built; the fallback).
#define STG_EXT_ISA base
#include "combine_chunks.h"

namespace stg_ext {
namespace cpu {
ChunkTable chunk_table_base() { return base::chunk_table("baseline"); }
}  // namespace cpu
}  // namespace stg_ext
