// The chunk loops of the chunk-parallel memory, compiled: models/memory/chunked.py's scan_keys with the reads
// of read_chunks done during the scan, their backward in one reverse pass, and chunk_coefficients with its
// backward; the same math and the same tensor layouts (see there for the derivation). After them, the layer's
// pointwise work around the scan, with its backward; then MAC's read of a segment (the memory MLP, norm, gate
// and the products to h's keys and values) and entry points that compose the jobs into one call each way (a
// memory write that is one group of chunks; MAC's write of a segment from its attention's output). Every
// (batch, head) pair is an independent recurrence, so the
// pairs are shared out over threads and each runs its whole chunk loop without a barrier; inside, the
// matrices are a few dozen wide, small enough that register-blocked loops beat a call into a BLAS per product.
//
// Layouts, all contiguous and pairs major, so that a pair's tokens are its slice of a [B H, N, d] tensor. Per
// memory layer l (R = d_l rows, C = d_{l+1} columns, n = R C), for m chunks of c tokens, s sub-chunks of
// r = c / s tokens each, and P = batch * heads pairs:
//   path[l]    [P, m s + 1, 2 R, C]  state (weights over momentum) before every sub-chunk and after the last
//   anchor[l]  [P, R, C]             gradient anchor of the first chunk (later chunks: their start weights)
//   k [P, m, c, d_0], v [P, m, c, d_L], zs[l] / ds[l] [P, m, c, C]  (zs only for hidden layers)
//   write      [P, m s, 2, r]        per-token scales of the weight and the momentum write
//   mix        [P, m s, 2, 2]        (W, S) -> (mix00 W + mix01 S, mix10 W + mix11 S)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include <omp.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace {

using i64 = int64_t;

// the widest vector registers the build targets: generic vectors wider than that are lowered piecewise by the
// compiler, which on AVX2 machines ran the products several times slower than registers of the native width
#if defined(__AVX512F__)
constexpr int VECTOR_BYTES = 64;
#elif defined(__AVX__)
constexpr int VECTOR_BYTES = 32;
#else
constexpr int VECTOR_BYTES = 16;
#endif

struct Dims {
    i64 depth, m, subs, pairs, c;
    const i64* widths;  // d_0 .. d_L
    i64 rows(i64 l) const { return widths[l]; }
    i64 cols(i64 l) const { return widths[l + 1]; }
    i64 numel(i64 l) const { return widths[l] * widths[l + 1]; }
    // pairs major: each pair's chunks, sub-chunks and states lie together
    i64 row(i64 i, i64 p) const { return p * m + i; }                 // chunk i in k, v, zs, ds
    i64 unit(i64 u, i64 p) const { return p * m * subs + u; }         // sub-chunk u in write, mix, q, G, BBC, y
    i64 stage(i64 u, i64 p) const { return p * (m * subs + 1) + u; }  // the state before sub-chunk u in path
    i64 max_width() const {
        i64 w = 0;
        for (i64 l = 0; l <= depth; ++l) w = widths[l] > w ? widths[l] : w;
        return w;
    }
};

// out (+)= alpha x w for out [rows, N] and w [inner, N] row-major, x [rows, inner] read with strides (rs, cs),
// so that x may be a transposed view. N is a compile-time width, and B output rows are computed together in
// vector registers: B x N / lanes independent accumulators keep the FMA units busy, where a single row
// would wait on each FMA's latency along the inner dimension.
template <typename T, int N, int B>
inline void gemm_rows(const T* __restrict x, i64 rs, i64 cs, const T* __restrict w, T* __restrict out, i64 inner,
                      T alpha, bool accumulate) {
    constexpr int lanes = N * sizeof(T) >= VECTOR_BYTES ? VECTOR_BYTES / sizeof(T) : N;
    constexpr int V = N / lanes;
    typedef T vec __attribute__((vector_size(lanes * sizeof(T)), aligned(sizeof(T))));  // unaligned loads
    vec acc[B][V] = {};
    for (i64 a = 0; a < inner; ++a) {
        const vec* wa = reinterpret_cast<const vec*>(w + a * N);
#pragma GCC unroll 8
        for (int r = 0; r < B; ++r) {
            const T xa = x[r * rs + a * cs];
#pragma GCC unroll 8
            for (int v = 0; v < V; ++v) acc[r][v] += xa * wa[v];
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < B; ++r) {
        vec* o = reinterpret_cast<vec*>(out + r * N);
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) o[v] = accumulate ? o[v] + alpha * acc[r][v] : alpha * acc[r][v];
    }
}

template <typename T, int N>
void gemm_fixed(const T* __restrict x, i64 rs, i64 cs, const T* __restrict w, T* __restrict out, i64 rows,
                i64 inner, T alpha, bool accumulate) {
    i64 t = 0;
    for (; t + 4 <= rows; t += 4) gemm_rows<T, N, 4>(x + t * rs, rs, cs, w, out + t * N, inner, alpha, accumulate);
    for (; t < rows; ++t) gemm_rows<T, N, 1>(x + t * rs, rs, cs, w, out + t * N, inner, alpha, accumulate);
}

template <typename T>
void gemm(const T* __restrict x, i64 rs, i64 cs, const T* __restrict w, T* __restrict out, i64 rows, i64 inner,
          i64 cols, T alpha, bool accumulate) {
    switch (cols) {
        case 8: return gemm_fixed<T, 8>(x, rs, cs, w, out, rows, inner, alpha, accumulate);
        case 16: return gemm_fixed<T, 16>(x, rs, cs, w, out, rows, inner, alpha, accumulate);
        case 32: return gemm_fixed<T, 32>(x, rs, cs, w, out, rows, inner, alpha, accumulate);
        case 64: return gemm_fixed<T, 64>(x, rs, cs, w, out, rows, inner, alpha, accumulate);
        default: break;
    }
    for (i64 t = 0; t < rows; ++t) {
        T* __restrict o = out + t * cols;
        if (!accumulate) std::memset(o, 0, cols * sizeof(T));
        for (i64 a = 0; a < inner; ++a) {
            const T xa = alpha * x[t * rs + a * cs];
            const T* __restrict wa = w + a * cols;
            for (i64 b = 0; b < cols; ++b) o[b] += xa * wa[b];
        }
    }
}

// out [cols, rows] = in [rows, cols]^T; compile-time shapes for the common widths let the compiler use
// vector shuffles instead of one scalar load and store per element
template <typename T, int R, int C>
void transpose_fixed(const T* __restrict in, T* __restrict out) {
    for (int b = 0; b < C; ++b)
        for (int a = 0; a < R; ++a) out[b * R + a] = in[a * C + b];
}

template <typename T>
void transpose(const T* __restrict in, T* __restrict out, i64 rows, i64 cols) {
    if (rows == 16 && cols == 16) return transpose_fixed<T, 16, 16>(in, out);
    if (rows == 16 && cols == 32) return transpose_fixed<T, 16, 32>(in, out);
    if (rows == 32 && cols == 16) return transpose_fixed<T, 32, 16>(in, out);
    for (i64 a = 0; a < rows; ++a)
        for (i64 b = 0; b < cols; ++b) out[b * rows + a] = in[a * cols + b];
}

// the layer inputs of sub-chunk tokens scaled by the weight and the momentum write: [r, R] each
template <typename T>
void scaled_rows(const T* __restrict h, const T* __restrict w, T* __restrict hw, T* __restrict hs, i64 r, i64 R) {
    for (i64 t = 0; t < r; ++t)
        for (i64 a = 0; a < R; ++a) {
            hw[t * R + a] = w[t] * h[t * R + a];
            hs[t * R + a] = w[r + t] * h[t * R + a];
        }
}

// sigmoid over a contiguous run, in its own loop so that the compiler can call a vector exp. The exponent is
// capped below overflow: under -ffast-math a vectorised float division is a reciprocal estimate refined by one
// Newton step, x (2 - a x), which turns 1 / inf into 0 * (2 - inf * 0) = NaN. At the cap the result is below
// 1e-34 (float) or 1e-304 (double) instead of a smaller positive number: sigmoid itself is unchanged.
template <typename T>
void sigmoid(const T* __restrict z, T* __restrict out, i64 count) {
    constexpr T cap = sizeof(T) == 4 ? T(80) : T(700);
    for (i64 x = 0; x < count; ++x) out[x] = T(1) / (T(1) + std::exp(std::min(-z[x], cap)));
}

// (W, S) -> mix (W, S)
template <typename T>
void mix_state(const T* __restrict mx, const T* __restrict in, T* __restrict out, i64 n) {
    for (i64 x = 0; x < n; ++x) {
        const T w = in[x], s = in[n + x];
        out[x] = mx[0] * w + mx[1] * s;
        out[n + x] = mx[2] * w + mx[3] * s;
    }
}

// The way back through mix_state: g_before = add + mix^T g_after. In the same pass over g_after, the gradient
// of the mix itself, g_mix += g_after (W; S)^T with (W; S) the state the mix was applied to.
template <typename T>
void unmix_state(const T* __restrict mx, const T* __restrict g_after, const T* __restrict add,
                 const T* __restrict state, T* __restrict g_before, T* __restrict g_mix, i64 n) {
    T g00 = 0, g01 = 0, g10 = 0, g11 = 0;
    for (i64 x = 0; x < n; ++x) {
        const T gw = g_after[x], gs = g_after[n + x], w = state[x], s = state[n + x];
        g_before[x] = add[x] + mx[0] * gw + mx[2] * gs;
        g_before[n + x] = add[n + x] + mx[1] * gw + mx[3] * gs;
        g00 += gw * w;
        g01 += gw * s;
        g10 += gs * w;
        g11 += gs * s;
    }
    g_mix[0] += g00;
    g_mix[1] += g01;
    g_mix[2] += g10;
    g_mix[3] += g11;
}

// per-thread scratch for one chunk of one (batch, head) pair
template <typename T>
struct Scratch {
    std::vector<std::vector<T>> hidden, slope, curve, gd, gz, ga;  // per layer
    std::vector<std::vector<T>> qx, qz, qxw, qxs;  // in a read, per layer: the queries' inputs, pre-activations,
                                                   // and their products with W and S
    std::vector<const T*> inputs, keys, signals;  // a read's layer inputs (the queries first), the keys' h and d
    std::vector<T> gate, bend, ge, gh, wt, hw, hs, gx_t, proj, scores, gscores, gxw, gxs, gxq, gzq, y;
    Scratch(const Dims& d)
        : hidden(d.depth), slope(d.depth), curve(d.depth), gd(d.depth), gz(d.depth), ga(d.depth), qx(d.depth),
          qz(d.depth), qxw(d.depth), qxs(d.depth), inputs(d.depth), keys(d.depth),
          signals(d.depth) {
        const i64 c = d.c, wide = c * d.max_width(), square = d.max_width() * d.max_width();
        for (i64 l = 0; l < d.depth; ++l) {
            hidden[l].resize(c * d.rows(l));
            for (auto* v : {&slope[l], &curve[l], &gd[l], &gz[l]}) v->resize(c * d.cols(l));
            ga[l].resize(d.numel(l));
            if (l) qx[l].resize(c * d.rows(l));  // layer 0's input is the queries themselves
            for (auto* v : {&qz[l], &qxw[l], &qxs[l]}) v->resize(c * d.cols(l));
        }
        for (auto* v : {&gate, &bend, &ge, &gh, &hw, &hs, &proj, &gxw, &gxs, &gxq, &gzq, &y}) v->resize(wide);
        wt.resize(square > wide ? square : wide);  // a transposed weight, or a sub-chunk's keys transposed
        gx_t.resize(2 * square);
        scores.resize(c * c);
        gscores.resize(c * c);
    }
};

// The queries of one sub-chunk, layer by layer: z = B_t x W + BC_t x S - sum_i G[t, i] (x . h_i) d_i, from the
// state (W; S) before the sub-chunk, with h_i and d_i the layer inputs and signals of the sub-chunk's keys
// (chunked.read_chunks). Leaves every layer's input x_l and pre-activation z_l in the scratch.
template <typename T>
void read_queries(const Dims& d, Scratch<T>& w, const std::vector<const T*>& state, const std::vector<const T*>& h,
                  const std::vector<const T*>& dd, const T* q, const T* g, const T* bbc, T* y) {
    const i64 L = d.depth, r = d.c / d.subs;
    w.inputs[0] = q;
    for (i64 l = 0; l < L; ++l) {
        const i64 R = d.rows(l), C = d.cols(l), n = d.numel(l);
        const T* x = w.inputs[l];
        T *z = w.qz[l].data(), *xw = w.qxw[l].data(), *xs = w.qxs[l].data();
        gemm(x, R, 1, state[l], xw, r, R, C, T(1), false);
        gemm(x, R, 1, state[l] + n, xs, r, R, C, T(1), false);
        for (i64 t = 0; t < r; ++t)
            for (i64 b = 0; b < C; ++b) z[t * C + b] = bbc[2 * t] * xw[t * C + b] + bbc[2 * t + 1] * xs[t * C + b];
        transpose(h[l], w.wt.data(), r, R);
        gemm(x, R, 1, w.wt.data(), w.scores.data(), r, R, r, T(1), false);  // x . h_i
        for (i64 x2 = 0; x2 < r * r; ++x2) w.scores[x2] *= g[x2];
        gemm(w.scores.data(), r, 1, dd[l], z, r, r, C, T(-1), true);
        if (l + 1 < L) {
            sigmoid(z, w.gate.data(), r * C);
            for (i64 x2 = 0; x2 < r * C; ++x2) w.qx[l + 1][x2] = z[x2] * w.gate[x2];
            w.inputs[l + 1] = w.qx[l + 1].data();
        } else {
            std::memcpy(y, z, r * C * sizeof(T));
        }
    }
}

// The backward of read_queries for one sub-chunk, after read_queries has run on it (its x_l, z_l and the
// products with W and S are in the scratch): z = B_t x W + BC_t x S - (G o x h^T) dd, taken back layer by layer
// to x (the queries, g_q), to the state (g_state, written), to B and BC (g_bbc [r, 2]), G (g_g [r, r]), and
// to the keys' h and dd of the sub-chunk (g_h, g_dd, rows written).
template <typename T>
void read_backward(const Dims& d, Scratch<T>& w, const std::vector<const T*>& state, const std::vector<const T*>& hs,
                   const std::vector<const T*>& ds, const T* g, const T* bbc, const T* g_y, T* g_q, T* g_g, T* g_bbc,
                   const std::vector<T*>& g_state, const std::vector<T*>& g_h, const std::vector<T*>& g_dd) {
    const i64 L = d.depth, r = d.c / d.subs;
    T* gz = w.gzq.data();
    std::memcpy(gz, g_y, r * d.cols(L - 1) * sizeof(T));
    for (i64 l = L - 1; l >= 0; --l) {
        const i64 R = d.rows(l), C = d.cols(l), n = d.numel(l);
        const T *x = w.inputs[l], *xw = w.qxw[l].data(), *xs = w.qxs[l].data();
        const bool first = l == L - 1;  // the first layer visited writes the gradients of G and BBC
        for (i64 t = 0; t < r; ++t) {
            T gb = 0, gbc = 0;
            for (i64 b = 0; b < C; ++b) {
                gb += gz[t * C + b] * xw[t * C + b];
                gbc += gz[t * C + b] * xs[t * C + b];
                w.gxw[t * C + b] = bbc[2 * t] * gz[t * C + b];
                w.gxs[t * C + b] = bbc[2 * t + 1] * gz[t * C + b];
            }
            g_bbc[2 * t] = (first ? T(0) : g_bbc[2 * t]) + gb;
            g_bbc[2 * t + 1] = (first ? T(0) : g_bbc[2 * t + 1]) + gbc;
        }
        gemm(x, 1, R, w.gxw.data(), g_state[l], R, r, C, T(1), false);  // (W; S): x^T g_xw over x^T g_xs
        gemm(x, 1, R, w.gxs.data(), g_state[l] + n, R, r, C, T(1), false);
        T* gx = w.gxq.data();  // g_x = g_xw W^T + g_xs S^T + (g_A o G) h
        transpose(state[l], w.wt.data(), R, C);
        gemm(w.gxw.data(), C, 1, w.wt.data(), gx, r, C, R, T(1), false);
        transpose(state[l] + n, w.wt.data(), R, C);
        gemm(w.gxs.data(), C, 1, w.wt.data(), gx, r, C, R, T(1), true);
        // scores x h^T and A = G o scores; g_A = -g_z dd^T, g_dd = -A^T g_z, g_G = g_A o scores
        transpose(hs[l], w.wt.data(), r, R);
        gemm(x, R, 1, w.wt.data(), w.scores.data(), r, R, r, T(1), false);
        transpose(ds[l], w.wt.data(), r, C);
        gemm(gz, C, 1, w.wt.data(), w.gscores.data(), r, C, r, T(-1), false);  // g_A
        for (i64 x2 = 0; x2 < r * r; ++x2) {
            g_g[x2] = (first ? T(0) : g_g[x2]) + w.gscores[x2] * w.scores[x2];
            w.scores[x2] *= g[x2];   // A
            w.gscores[x2] *= g[x2];  // g_A o G
        }
        gemm(w.scores.data(), 1, r, gz, g_dd[l], r, r, C, T(-1), false);
        gemm(w.gscores.data(), r, 1, hs[l], gx, r, r, R, T(1), true);  // + (g_A o G) h
        gemm(w.gscores.data(), 1, r, x, g_h[l], r, r, R, T(1), false);  // g_h = (g_A o G)^T x
        if (l == 0) {
            std::memcpy(g_q, gx, r * R * sizeof(T));
        } else {  // through x_l = silu(z_{l-1})
            const T* zp = w.qz[l - 1].data();
            sigmoid(zp, w.gate.data(), r * R);
            for (i64 x2 = 0; x2 < r * R; ++x2) {
                const T sg = w.gate[x2];
                gz[x2] = gx[x2] * sg * (1 + zp[x2] * (1 - sg));
            }
        }
    }
}

// Key t's gradient at the anchor is, per layer, the outer product h_l^T d_l: its squared norm is
// n^2 = sum_l |h_l|^2 |d_l|^2. Above `bound`, every d_l of the key is scaled by c = bound / n (chunked's
// clip_scales); returns c, 1 where nothing was clipped.
template <typename T, typename H, typename D>
T clip_key(const Dims& d, const H& h, const D& dl, i64 t, T bound) {
    T sq = 0;
    for (i64 l = 0; l < d.depth; ++l) {
        const i64 R = d.rows(l), C = d.cols(l);
        T hh = 0, dd = 0;
        for (i64 a = 0; a < R; ++a) hh += h[l][t * R + a] * h[l][t * R + a];
        for (i64 b = 0; b < C; ++b) dd += dl[l][t * C + b] * dl[l][t * C + b];
        sq += hh * dd;
    }
    if (!(sq > bound * bound)) return T(1);
    const T scale = bound / std::sqrt(sq);
    for (i64 l = 0; l < d.depth; ++l)
        for (i64 b = 0; b < d.cols(l); ++b) dl[l][t * d.cols(l) + b] *= scale;
    return scale;
}

// The clip's share of the backward for key t, whose clipped signals are d~_l = c d_l (chunked.unclip):
// with b = sum_l <g_l, d~_l> / bound^2 from the gradients g_l of d~_l's uses, g_l -= b |h_l|^2 d~_l and h_l's
// gradient gains -b |d~_l|^2 h_l. Nothing for keys that were not clipped (c = 1, constant).
template <typename T, typename H, typename D, typename G, typename GH>
void unclip_key(const Dims& d, const H& h, const D& dl, G& g, GH& g_h, i64 t, T scale, T bound) {
    if (!(scale < T(1))) return;
    T b = 0;
    for (i64 l = 0; l < d.depth; ++l)
        for (i64 x = 0; x < d.cols(l); ++x) b += g[l][t * d.cols(l) + x] * dl[l][t * d.cols(l) + x];
    b /= bound * bound;
    for (i64 l = 0; l < d.depth; ++l) {
        const i64 R = d.rows(l), C = d.cols(l);
        T hh = 0, dd = 0;
        for (i64 a = 0; a < R; ++a) hh += h[l][t * R + a] * h[l][t * R + a];
        for (i64 x = 0; x < C; ++x) dd += dl[l][t * C + x] * dl[l][t * C + x];
        for (i64 x = 0; x < C; ++x) g[l][t * C + x] -= b * hh * dl[l][t * C + x];
        for (i64 a = 0; a < R; ++a) g_h[l][t * R + a] -= b * dd * h[l][t * R + a];
    }
}

// The forward scan, reading each sub-chunk's queries from the state before it as it goes. Recording (path
// given, training): the state before every sub-chunk and the keys' z_l and d_l go to outputs for the backward
// pass. Otherwise (inference) only the running state is kept and the end state is returned: nothing per
// chunk is stored.
template <typename T>
struct Forward {
    const Dims& d;
    const T* const* start;  // [P, 2 R, C] state before the first sub-chunk
    const T* const* anchor;
    const T *k, *v, *write, *mix;
    T* const* path;  // recording: [P, m s + 1, 2 R, C]; else null
    T* const* zs;    // recording: [P, m, c, C] for hidden layers
    T* const* ds;
    const T *q, *G, *BBC;  // [P, m s, r, d_0], [P, m s, r, r], [P, m s, r, 2]
    T* y;                  // [P, m s, r, d_L]
    T* const* end;         // not recording: [P, 2 R, C] state after the last sub-chunk
    T bound;               // > 0: each key's d_l scaled so that its gradient norm is at most bound (clip_key)
    T* scales;             // recording with a bound: [P, m, c] the scale of each key

    void run(i64 lo, i64 hi) const {
        const i64 L = d.depth, c = d.c, s = d.subs, r = c / s;
        Scratch<T> w(d);
        std::vector<std::vector<T>> z_own(L), d_own(L), now(L), next(L);  // reading mode's per-chunk values
        for (i64 l = 0; l < L; ++l) {
            if (l + 1 < L) z_own[l].resize(c * d.cols(l));  // pre-activations of hidden layers only
            d_own[l].resize(c * d.cols(l));
            now[l].resize(2 * d.numel(l));
            next[l].resize(2 * d.numel(l));
        }
        std::vector<const T*> at(L), h(L), before(L);
        std::vector<T*> zl(L), dl(L), after(L);
        for (i64 p = lo; p < hi; ++p) {
            for (i64 l = 0; l < L; ++l) {
                const i64 size = 2 * d.numel(l);
                T* first = path ? path[l] + d.stage(0, p) * size : now[l].data();
                std::memcpy(first, start[l] + p * size, size * sizeof(T));
            }
            for (i64 i = 0; i < d.m; ++i) {
                const i64 row = d.row(i, p);
                for (i64 l = 0; l < L; ++l) {
                    const i64 cells = c * d.cols(l);
                    zl[l] = l + 1 == L ? nullptr : path ? zs[l] + row * cells : z_own[l].data();
                    dl[l] = path ? ds[l] + row * cells : d_own[l].data();
                    const T* chunk_start = path ? path[l] + d.stage(i * s, p) * 2 * d.numel(l) : now[l].data();
                    at[l] = i ? chunk_start : anchor[l] + p * d.numel(l);
                }
                keys_at_anchor(w, at, h, zl, dl, row);
                for (i64 j = 0; j < s; ++j) {
                    const i64 u = i * s + j;
                    for (i64 l = 0; l < L; ++l) {
                        const i64 size = 2 * d.numel(l);
                        before[l] = path ? path[l] + d.stage(u, p) * size : now[l].data();
                        after[l] = path ? path[l] + d.stage(u + 1, p) * size : next[l].data();
                    }
                    read(w, before, h, dl, u, p, j * r);
                    // (W, S) -> (B W + BC S - h_w^T d, A S - h_s^T d)
                    for (i64 l = 0; l < L; ++l) {
                        const i64 R = d.rows(l), C = d.cols(l), n = d.numel(l);
                        mix_state(mix + d.unit(u, p) * 4, before[l], after[l], n);
                        scaled_rows(h[l] + j * r * R, write + d.unit(u, p) * 2 * r, w.hw.data(), w.hs.data(), r, R);
                        gemm(w.hw.data(), 1, R, dl[l] + j * r * C, after[l], R, r, C, T(-1), true);
                        gemm(w.hs.data(), 1, R, dl[l] + j * r * C, after[l] + n, R, r, C, T(-1), true);
                    }
                    if (!path) std::swap(now, next);
                }
            }
            if (!path)
                for (i64 l = 0; l < L; ++l)
                    std::memcpy(end[l] + p * 2 * d.numel(l), now[l].data(), 2 * d.numel(l) * sizeof(T));
        }
    }

    // every key of the chunk through the memory at the anchor, z_l = h_l A_l and h_{l+1} = silu(z_l), then the
    // back-propagated signals d_{L-1} = M(k) - v and d_l = (d_{l+1} A_{l+1}^T) silu'(z_l), clipped with a bound
    void keys_at_anchor(Scratch<T>& w, const std::vector<const T*>& at, std::vector<const T*>& h,
                        const std::vector<T*>& zl, const std::vector<T*>& dl, i64 row) const {
        const i64 L = d.depth, c = d.c;
        h[0] = k + row * c * d.rows(0);
        for (i64 l = 0; l + 1 < L; ++l) {
            const i64 R = d.rows(l), C = d.cols(l);
            gemm(h[l], R, 1, at[l], zl[l], c, R, C, T(1), false);
            sigmoid(zl[l], w.gate.data(), c * C);
            for (i64 x = 0; x < c * C; ++x) w.hidden[l + 1][x] = zl[l][x] * w.gate[x];
            h[l + 1] = w.hidden[l + 1].data();
        }
        const i64 out_w = d.cols(L - 1);
        gemm(h[L - 1], d.rows(L - 1), 1, at[L - 1], dl[L - 1], c, d.rows(L - 1), out_w, T(1), false);
        const T* vr = v + row * c * out_w;
        for (i64 x = 0; x < c * out_w; ++x) dl[L - 1][x] -= vr[x];
        for (i64 l = L - 2; l >= 0; --l) {
            const i64 C = d.cols(l), cn = d.cols(l + 1);
            transpose(at[l + 1], w.wt.data(), C, cn);
            gemm(dl[l + 1], cn, 1, w.wt.data(), dl[l], c, cn, C, T(1), false);
            sigmoid(zl[l], w.gate.data(), c * C);
            for (i64 x = 0; x < c * C; ++x) dl[l][x] *= w.gate[x] * (1 + zl[l][x] * (1 - w.gate[x]));
        }
        if (bound > 0)
            for (i64 t = 0; t < c; ++t) {
                const T scale = clip_key(d, h, dl, t, bound);
                if (scales) scales[row * c + t] = scale;
            }
    }

    void read(Scratch<T>& w, const std::vector<const T*>& before, const std::vector<const T*>& h,
              const std::vector<T*>& dl, i64 u, i64 p, i64 offset) const {
        const i64 r = d.c / d.subs, at = d.unit(u, p);
        for (i64 l = 0; l < d.depth; ++l) {
            w.keys[l] = h[l] + offset * d.rows(l);
            w.signals[l] = dl[l] + offset * d.cols(l);
        }
        read_queries(d, w, before, w.keys, w.signals, q + at * r * d.rows(0), G + at * r * r, BBC + at * r * 2,
                     y + at * r * d.cols(d.depth - 1));
    }
};

template <typename T>
struct Backward {
    const Dims& d;
    const T* const* anchor;
    const T *k, *write, *mix;
    const T* const* path;
    const T* const* zs;
    const T* const* ds;
    const T *q, *G, *BBC, *g_y;  // the reads: [P, m s, r, d_0], [P, m s, r, r], [P, m s, r, 2], [P, m s, r, d_L]
    const T* const* g_end;  // [P, 2 R, C] gradient at the end state
    T *g_k, *g_dout;    // [P, m, c, d_0] and [P, m, c, d_L] (the gradient of M(k) - v)
    T *g_write, *g_mix;  // [P, m s, 2, r] and [P, m s, 2, 2], zero-filled
    T *g_q, *g_G, *g_BBC;  // laid out like q, G and BBC
    T* const* g_states;
    T* const* g_anchor;
    T bound;          // the forward's clip bound, or 0
    const T* scales;  // with a bound: [P, m, c] the scale of each key

    void run(i64 lo, i64 hi) const {
        const i64 L = d.depth, c = d.c, s = d.subs, r = c / s;
        Scratch<T> w(d);
        // what the chunk's reads send back: to the states before its sub-chunks, to the keys' h and d
        std::vector<std::vector<T>> read_state(L), read_h(L), read_d(L);
        // the gradient at the end state of each of the chunk's sub-chunks and of the one before: slot j + 1 is
        // sub-chunk j's, slot 0 becomes the next chunk's (the one before) slot s
        std::vector<std::vector<T>> g_after(L);
        for (i64 l = 0; l < L; ++l) {
            g_after[l].resize((s + 1) * 2 * d.numel(l));
            read_state[l].resize(s * 2 * d.numel(l));
            read_h[l].resize(c * d.rows(l));
            read_d[l].resize(c * d.cols(l));
        }
        std::vector<const T*> at(L), h(L), before(L), hs(L), dd(L);
        std::vector<T*> g_before(L), g_h(L), g_dd(L);
        for (i64 p = lo; p < hi; ++p)
            for (i64 i = d.m - 1; i >= 0; --i) {
                const i64 row = d.row(i, p), first = i * s;
                for (i64 l = 0; l < L; ++l) {
                    const i64 n2 = 2 * d.numel(l);
                    T* last = g_after[l].data() + s * n2;
                    if (i == d.m - 1)
                        std::memcpy(last, g_end[l] + p * n2, n2 * sizeof(T));
                    else
                        std::memcpy(last, g_after[l].data(), n2 * sizeof(T));
                }
                auto state = [&](i64 l, i64 u) { return g_after[l].data() + (u - first + 1) * 2 * d.numel(l); };
                auto incoming = [&](i64 l, i64 u) { return read_state[l].data() + (u - first) * 2 * d.numel(l); };
                for (i64 l = 0; l < L; ++l)
                    at[l] = i ? path[l] + d.stage(first, p) * 2 * d.numel(l) : anchor[l] + p * d.numel(l);
                h[0] = k + row * c * d.rows(0);
                for (i64 l = 0; l + 1 < L; ++l) {  // h_{l+1} = silu(z_l), silu'(z_l), silu''(z_l)
                    const i64 cells = c * d.cols(l);
                    const T* z = zs[l] + row * cells;
                    sigmoid(z, w.gate.data(), cells);
                    for (i64 x = 0; x < cells; ++x) {
                        const T g = w.gate[x], one = 1;
                        w.hidden[l + 1][x] = z[x] * g;
                        w.slope[l][x] = g * (one + z[x] * (one - g));
                        w.curve[l][x] = g * (one - g) * (2 + z[x] * (one - 2 * g));
                    }
                    h[l + 1] = w.hidden[l + 1].data();
                }
                // first the chunk's reads, recomputed sub-chunk by sub-chunk and taken back
                for (i64 j = 0; j < s; ++j) {
                    const i64 u = first + j, unit = d.unit(u, p);
                    for (i64 l = 0; l < L; ++l) {
                        before[l] = path[l] + d.stage(u, p) * 2 * d.numel(l);
                        hs[l] = h[l] + j * r * d.rows(l);
                        dd[l] = ds[l] + (row * c + j * r) * d.cols(l);
                        g_before[l] = read_state[l].data() + j * 2 * d.numel(l);
                        g_h[l] = read_h[l].data() + j * r * d.rows(l);
                        g_dd[l] = read_d[l].data() + j * r * d.cols(l);
                    }
                    const T *g = G + unit * r * r, *bbc = BBC + unit * r * 2;
                    read_queries(d, w, before, hs, dd, q + unit * r * d.rows(0), g, bbc, w.y.data());
                    read_backward(d, w, before, hs, dd, g, bbc, g_y + unit * r * d.cols(L - 1),
                                  g_q + unit * r * d.rows(0), g_G + unit * r * r, g_BBC + unit * r * 2, g_before, g_h,
                                  g_dd);
                }
                // back through the mixing of all but the chunk's first sub-chunk
                for (i64 l = 0; l < L; ++l)
                    for (i64 u = first + s - 1; u > first; --u)
                        unmix_state(mix + d.unit(u, p) * 4, state(l, u), incoming(l, u),
                                    path[l] + d.stage(u, p) * 2 * d.numel(l), state(l, u - 1),
                                    g_mix + d.unit(u, p) * 4, d.numel(l));
                // the writes subtract h_w^T d: the gradient of d
                for (i64 l = 0; l < L; ++l) {
                    const i64 R = d.rows(l), C = d.cols(l), n = d.numel(l);
                    std::memcpy(w.gd[l].data(), read_d[l].data(), c * C * sizeof(T));
                    for (i64 j = 0; j < s; ++j) {
                        const T* gx = state(l, first + j);
                        scaled_rows(h[l] + j * r * R, write + d.unit(first + j, p) * 2 * r, w.hw.data(), w.hs.data(),
                                    r, R);
                        T* gdj = w.gd[l].data() + j * r * C;
                        gemm(w.hw.data(), R, 1, gx, gdj, r, R, C, T(-1), true);
                        gemm(w.hs.data(), R, 1, gx + n, gdj, r, R, C, T(-1), true);
                    }
                }
                // the clip's share: to the gradients of d and of the keys' layer inputs (in read_h)
                if (bound > 0) {
                    std::vector<const T*> dk(L);
                    std::vector<T*> gdk(L), ghk(L);
                    for (i64 l = 0; l < L; ++l) {
                        dk[l] = ds[l] + row * c * d.cols(l);
                        gdk[l] = w.gd[l].data();
                        ghk[l] = read_h[l].data();
                    }
                    for (i64 t = 0; t < c; ++t) unclip_key(d, h, dk, gdk, ghk, t, scales[row * c + t], bound);
                }
                // then through d's own back-propagation: d_l = silu'(z_l) e_l, e_l = d_{l+1} A_{l+1}^T
                for (i64 l = 0; l + 1 < L; ++l) {
                    const i64 C = d.cols(l), cn = d.cols(l + 1), cells = c * C;
                    const T* dn = ds[l + 1] + row * c * cn;
                    transpose(at[l + 1], w.wt.data(), C, cn);
                    gemm(dn, cn, 1, w.wt.data(), w.bend.data(), c, cn, C, T(1), false);
                    const T* g_read = read_h[l + 1].data();  // the reads' gradient of h_{l+1} = silu(z_l)
                    for (i64 x = 0; x < cells; ++x) {
                        w.ge[x] = w.gd[l][x] * w.slope[l][x];
                        w.gz[l][x] = g_read[x] * w.slope[l][x] + w.gd[l][x] * w.bend[x] * w.curve[l][x];
                    }
                    gemm(w.ge.data(), C, 1, at[l + 1], w.gd[l + 1].data(), c, C, cn, T(1), true);
                    gemm(w.ge.data(), 1, C, dn, w.ga[l + 1].data(), C, c, cn, T(1), false);
                }
                const i64 out_cells = c * d.cols(L - 1);
                if (bound > 0)  // d~_{L-1} = c (M(k) - v)
                    for (i64 t = 0; t < c; ++t)
                        for (i64 x = 0; x < d.cols(L - 1); ++x) w.gd[L - 1][t * d.cols(L - 1) + x] *= scales[row * c + t];
                std::memcpy(w.gz[L - 1].data(), w.gd[L - 1].data(), out_cells * sizeof(T));
                std::memcpy(g_dout + row * out_cells, w.gd[L - 1].data(), out_cells * sizeof(T));
                // and through the keys' forward pass at the anchor, z_l = h_l A_l, h_{l+1} = silu(z_l), down to k.
                // On the way, with g_hw = gx d^T per sub-chunk (the gradient of the written layer inputs, negated),
                // the gradients of the write scales and of the keys' layer inputs:
                // g_h = g_z A^T - w_t g_hw_W - w'_t g_hw_S
                for (i64 l = L - 1; l >= 0; --l) {
                    const i64 R = d.rows(l), C = d.cols(l), n = d.numel(l);
                    gemm(h[l], 1, R, w.gz[l].data(), w.ga[l].data(), R, c, C, T(1), l != 0);
                    transpose(at[l], w.wt.data(), R, C);
                    T* gh = l ? w.gh.data() : g_k + row * c * R;
                    gemm(w.gz[l].data(), C, 1, w.wt.data(), gh, c, C, R, T(1), false);
                    const T* dl = ds[l] + row * c * C;
                    for (i64 j = 0; j < s; ++j) {
                        const i64 u = first + j;
                        const T* gx = state(l, u);
                        const T* wj = write + d.unit(u, p) * 2 * r;
                        T* gw = g_write + d.unit(u, p) * 2 * r;
                        transpose(gx, w.gx_t.data(), R, C);
                        transpose(gx + n, w.gx_t.data() + n, R, C);
                        for (i64 part = 0; part < 2; ++part) {
                            gemm(dl + j * r * C, C, 1, w.gx_t.data() + part * n, w.proj.data(), r, C, R, T(1), false);
                            for (i64 t = 0; t < r; ++t) {
                                const T* ht = h[l] + (j * r + t) * R;
                                const T* pt = w.proj.data() + t * R;
                                T* gt = gh + (j * r + t) * R;
                                T dot = 0;
                                for (i64 a = 0; a < R; ++a) {
                                    gt[a] -= wj[part * r + t] * pt[a];
                                    dot += pt[a] * ht[a];
                                }
                                gw[part * r + t] -= dot;
                            }
                        }
                    }
                    if (l)
                        for (i64 x = 0; x < c * R; ++x) w.gz[l - 1][x] += w.gh[x] * w.slope[l - 1][x];
                    else  // k is also the reads' h_0
                        for (i64 x = 0; x < c * R; ++x) gh[x] += read_h[0][x];
                }
                // the chunk's start state, through its first sub-chunk's mixing; the anchor is its start weights
                for (i64 l = 0; l < L; ++l) {
                    const i64 n = d.numel(l);
                    T* before = i ? state(l, first - 1) : g_states[l] + p * 2 * n;
                    unmix_state(mix + d.unit(first, p) * 4, state(l, first), incoming(l, first),
                                path[l] + d.stage(first, p) * 2 * n, before, g_mix + d.unit(first, p) * 4, n);
                    if (i)
                        for (i64 x = 0; x < n; ++x) before[x] += w.ga[l][x];
                    else
                        std::memcpy(g_anchor[l] + p * n, w.ga[l].data(), n * sizeof(T));
                }
            }
    }
};

// The scalar coefficients of every sub-chunk's recurrences from its gates (chunked.chunk_coefficients,
// the same math), and their backward. Per unit (sub-chunk, pair) of r tokens, with la, lb the cumulative
// log eta and log keep: F[t, j] = exp(clamp(lb_t - lb_j, -80, 0)) and P[j, i] = exp(clamp(la_j - la_i, -80, 0))
// on and below the diagonal, G = (F P) o theta, BC_t = sum_j F[t, j] exp(la_j), B_t = exp(lb_t).
// Layouts: gates [U, r]; G [U, r, r]; BBC [U, r, 2]; mix [U, 2, 2]; write [U, 2, r].
template <typename T>
struct Coefficients {
    i64 r;
    const T *le, *lk, *th;
    T *G, *BBC, *mix, *write;                           // forward outputs
    const T *gG, *gBBC, *gmix, *gwrite;                 // backward: incoming gradients (null in the forward)
    T *gle, *glk, *gth;                                 // backward outputs

    void run(i64 lo, i64 hi) const {
        std::vector<T> la(r), lb(r), ea(r), F(r * r), P(r * r), M(r * r), gM(r * r), gla(r), glb(r), gbc(r);
        for (i64 u = lo; u < hi; ++u) {
            const T *e = le + u * r, *k = lk + u * r, *t_ = th + u * r;
            T sa = 0, sb = 0;
            for (i64 t = 0; t < r; ++t) {
                la[t] = sa += e[t];
                lb[t] = sb += k[t];
                ea[t] = std::exp(la[t]);
            }
            for (i64 t = 0; t < r; ++t)
                for (i64 j = 0; j < r; ++j) {
                    F[t * r + j] = j <= t ? std::exp(clamp(lb[t] - lb[j])) : T(0);
                    P[t * r + j] = j <= t ? std::exp(clamp(la[t] - la[j])) : T(0);
                }
            for (i64 t = 0; t < r; ++t)  // M = F P, both lower triangular
                for (i64 i = 0; i <= t; ++i) {
                    T acc = 0;
                    for (i64 j = i; j <= t; ++j) acc += F[t * r + j] * P[j * r + i];
                    M[t * r + i] = acc;
                }
            if (!gG) {
                forward(u, t_, ea, lb, F, P, M);
            } else {
                backward(u, t_, la, lb, ea, F, P, M, gM, gla, glb, gbc);
            }
        }
    }

    static T clamp(T x) { return x < T(-80) ? T(-80) : (x > T(0) ? T(0) : x); }
    static bool inside(T x) { return x >= T(-80) && x <= T(0); }  // where clamp passes the gradient

    void forward(i64 u, const T* t_, const std::vector<T>& ea, const std::vector<T>& lb, const std::vector<T>& F,
                 const std::vector<T>& P, const std::vector<T>& M) const {
        T *g = G + u * r * r, *bbc = BBC + u * r * 2, *mx = mix + u * 4, *wr = write + u * 2 * r;
        for (i64 t = 0; t < r; ++t) {
            T bc = 0;
            for (i64 j = 0; j <= t; ++j) bc += F[t * r + j] * ea[j];
            bbc[2 * t] = std::exp(lb[t]);
            bbc[2 * t + 1] = bc;
            for (i64 i = 0; i < r; ++i) g[t * r + i] = i <= t ? M[t * r + i] * t_[i] : T(0);
        }
        mx[0] = bbc[2 * (r - 1)];
        mx[1] = bbc[2 * (r - 1) + 1];
        mx[2] = 0;
        mx[3] = ea[r - 1];
        for (i64 i = 0; i < r; ++i) {
            wr[i] = g[(r - 1) * r + i];
            wr[r + i] = P[(r - 1) * r + i] * t_[i];
        }
    }

    void backward(i64 u, const T* t_, const std::vector<T>& la, const std::vector<T>& lb, const std::vector<T>& ea,
                  const std::vector<T>& F, const std::vector<T>& P, const std::vector<T>& M, std::vector<T>& gM,
                  std::vector<T>& gla, std::vector<T>& glb, std::vector<T>& gbc) const {
        const T *g_G = gG + u * r * r, *g_bbc = gBBC + u * r * 2, *g_mx = gmix + u * 4, *g_wr = gwrite + u * 2 * r;
        T* g_th = gth + u * r;
        const i64 last = r - 1;
        for (i64 i = 0; i < r; ++i) {  // G = M o theta and write = (G[last], P[last] o theta)
            T acc = g_wr[i] * M[last * r + i] + g_wr[r + i] * P[last * r + i];
            for (i64 t = i; t < r; ++t) {
                acc += g_G[t * r + i] * M[t * r + i];
                gM[t * r + i] = g_G[t * r + i] * t_[i];
            }
            gM[last * r + i] += g_wr[i] * t_[i];
            g_th[i] = acc;
        }
        for (i64 t = 0; t < r; ++t) {  // BBC = (B, BC) and mix = (B_last, BC_last, 0, A_last)
            const T gb = g_bbc[2 * t] + (t == last ? g_mx[0] : T(0));
            gbc[t] = g_bbc[2 * t + 1] + (t == last ? g_mx[1] : T(0));
            glb[t] = gb * std::exp(lb[t]);
            gla[t] = t == last ? g_mx[3] * ea[last] : T(0);
        }
        for (i64 j = 0; j < r; ++j) {  // BC_t = sum_j F[t, j] exp(la_j)
            T acc = 0;
            for (i64 t = j; t < r; ++t) acc += F[t * r + j] * gbc[t];
            gla[j] += acc * ea[j];
        }
        for (i64 t = 0; t < r; ++t)  // through F: gF = gM P^T + gbc exp(la)^T, into lb_t - lb_j
            for (i64 j = 0; j <= t; ++j) {
                if (!inside(lb[t] - lb[j])) continue;
                T gf = gbc[t] * ea[j];
                for (i64 i = 0; i <= j; ++i) gf += gM[t * r + i] * P[j * r + i];
                const T d = gf * F[t * r + j];
                glb[t] += d;
                glb[j] -= d;
            }
        for (i64 j = 0; j < r; ++j)  // through P: gP = F^T gM (+ the write's last row), into la_j - la_i
            for (i64 i = 0; i <= j; ++i) {
                if (!inside(la[j] - la[i])) continue;
                T gp = j == last ? g_wr[r + i] * t_[i] : T(0);
                for (i64 t = j; t < r; ++t) gp += F[t * r + j] * gM[t * r + i];
                const T d = gp * P[j * r + i];
                gla[j] += d;
                gla[i] -= d;
            }
        T ra = 0, rb = 0;  // cumulative sums back to the gates
        for (i64 t = last; t >= 0; --t) {
            gle[u * r + t] = ra += gla[t];
            glk[u * r + t] = rb += glb[t];
        }
    }
};

// The layer's pointwise work around the scan: NeuralMemory.project's conv, SiLU and L2 norms, and
// NeuralMemory.finish's RMS norm and sigmoid gate. Tokens are independent, so they are shared out over threads.
// In torch with autograd this is some two dozen passes over the activations each way; here it is one pass
// forward and one or two back. The weights' gradients are summed per thread into rows of `partial` that the
// caller adds up. A null incoming gradient means the forward.

// Causal depthwise conv, SiLU, and the L2 norm of q and k: from u = (tail; p) [B, K - 1 + N, 3 H dh], the
// projections p with the K - 1 inputs before them, to q, k, v [B, H, N, dh] each. The backward takes the
// gradients of q, k, v to g_a [B, N, 3 H dh] at the conv's output, and sums g_a's products with the conv's inputs
// into partial [threads, K + 1, 3 H dh] (the weight's gradient, then the bias's).
template <typename T>
struct ConvActivateNormalise {
    i64 n, heads, dh, kernel;
    const T *tail, *p, *w, *bias;  // w [K, 3 H dh]
    T *const *out;                 // forward: q, k, v
    const T *const *g_out;         // backward: their gradients
    T *g_a, *partial;
    static constexpr T min_norm = T(1e-6);  // l2_normalise clamps the norm here

    i64 channels() const { return 3 * heads * dh; }
    const T* row(i64 b, i64 s) const {
        const i64 C = channels(), before = kernel - 1;
        return s < before ? tail + (b * before + s) * C : p + (b * n + s - before) * C;
    }
    // a = bias + sum_j w_j u_{t + j}, s = sigmoid(a), h = silu(a)
    void activate(i64 b, i64 t, T* a, T* s, T* h) const {
        const i64 C = channels();
        for (i64 c = 0; c < C; ++c) a[c] = bias[c];
        for (i64 j = 0; j < kernel; ++j) {
            const T *u = row(b, t + j), *wj = w + j * C;
            for (i64 c = 0; c < C; ++c) a[c] += wj[c] * u[c];
        }
        sigmoid(a, s, C);
        for (i64 c = 0; c < C; ++c) h[c] = a[c] * s[c];
    }
    static T norm(const T* x, i64 d) {
        T sq = 0;
        for (i64 e = 0; e < d; ++e) sq += x[e] * x[e];
        return std::sqrt(sq);
    }

    void run(i64 lo, i64 hi) const {  // over tokens i = b N + t
        const i64 C = channels();
        std::vector<T> a(C), s(C), h(C);
        T* sums = g_out ? partial + omp_get_thread_num() * (kernel + 1) * C : nullptr;
        for (i64 i = lo; i < hi; ++i) {
            const i64 b = i / n, t = i % n;
            activate(b, t, a.data(), s.data(), h.data());
            T* ga = g_out ? g_a + i * C : nullptr;
            for (i64 part = 0; part < 3; ++part)
                for (i64 head = 0; head < heads; ++head) {
                    const i64 c0 = (part * heads + head) * dh, at = ((b * heads + head) * n + t) * dh;
                    const T* x = h.data() + c0;
                    const T nx = part < 2 ? norm(x, dh) : T(1), scale = T(1) / (nx > min_norm ? nx : min_norm);
                    if (!g_out) {
                        for (i64 e = 0; e < dh; ++e) out[part][at + e] = x[e] * scale;
                        continue;
                    }
                    const T* g = g_out[part] + at;
                    T along = 0;  // above the clamp, y = x / |x| moves as (g - y (g . y)) / |x|
                    if (part < 2 && nx > min_norm) {
                        for (i64 e = 0; e < dh; ++e) along += g[e] * x[e];
                        along *= scale * scale;
                    }
                    for (i64 e = 0; e < dh; ++e) {  // then times silu'(a) = s (1 + a (1 - s))
                        const T sc = s[c0 + e];
                        ga[c0 + e] = (g[e] - x[e] * along) * scale * sc * (T(1) + a[c0 + e] * (T(1) - sc));
                    }
                }
            if (!g_out) continue;
            for (i64 j = 0; j < kernel; ++j) {
                const T* u = row(b, t + j);
                T* sw = sums + j * C;
                for (i64 c = 0; c < C; ++c) sw[c] += ga[c] * u[c];
            }
            T* sb = sums + kernel * C;
            for (i64 c = 0; c < C; ++c) sb[c] += ga[c];
        }
    }
};

// The rest of the conv's backward, over the rows s of u = (tail; p): g_u_s = sum_j w_j g_a_{s - j}.
template <typename T>
struct ConvInputGradient {
    i64 n, channels, kernel;
    const T *w, *g_a;
    T *g_tail, *g_p;

    void run(i64 lo, i64 hi) const {
        const i64 C = channels, before = kernel - 1;
        for (i64 i = lo; i < hi; ++i) {
            const i64 b = i / (before + n), s = i % (before + n);
            T* g = s < before ? g_tail + (b * before + s) * C : g_p + (b * n + s - before) * C;
            for (i64 c = 0; c < C; ++c) g[c] = 0;
            for (i64 j = 0; j < kernel; ++j) {
                if (s - j < 0 || s - j >= n) continue;
                const T *wj = w + j * C, *ga = g_a + (b * n + s - j) * C;
                for (i64 c = 0; c < C; ++c) g[c] += wj[c] * ga[c];
            }
        }
    }
};

// One token's RMS norm with a weight over d channels, y = x r w with r = (mean x^2 + eps)^-1/2 (inverse_rms), and
// its backward: from g, the gradient at y (times any gate applied after it), to g_x = r (g w - x_hat mean(g w
// x_hat)) with x_hat = x r, adding g x_hat (the weight's gradient) into sums. NormGate, MAC's read and MAC's
// write share it.
template <typename T>
T inverse_rms(const T* x, i64 d, T eps) {
    T sq = 0;
    for (i64 e = 0; e < d; ++e) sq += x[e] * x[e];
    return T(1) / std::sqrt(sq / T(d) + eps);
}

template <typename T>
void rms_norm_backward(const T* x, const T* w, T r, const T* g, i64 d, T* g_x, T* sums) {
    T dot = 0;
    for (i64 e = 0; e < d; ++e) {
        const T normed = x[e] * r;
        sums[e] += g[e] * normed;
        dot += g[e] * w[e] * normed;
    }
    dot /= T(d);
    for (i64 e = 0; e < d; ++e) g_x[e] = r * (g[e] * w[e] - x[e] * r * dot);
}

// Each head's read RMS-normed with a weight, then gated: y [B, H, N, dh] and gate logits [B, N, H dh] to out
// [B, N, H dh], tokens major as the output projection takes them. The backward gives g_y and g_logits, and sums
// the norm weight's gradient into partial [threads, dh].
template <typename T>
struct NormGate {
    i64 n, heads, dh;
    T eps;
    const T *y, *weight, *logits;
    T* out;          // forward
    const T* g_out;  // backward: the incoming gradient
    T *g_y, *g_logits, *partial;

    void run(i64 lo, i64 hi) const {  // over tokens i = b N + t
        const i64 D = heads * dh;
        std::vector<T> s(D), gated(dh);
        T* sums = g_out ? partial + omp_get_thread_num() * dh : nullptr;
        for (i64 i = lo; i < hi; ++i) {
            const i64 b = i / n, t = i % n;
            sigmoid(logits + i * D, s.data(), D);
            for (i64 head = 0; head < heads; ++head) {
                const i64 at = ((b * heads + head) * n + t) * dh, c = i * D + head * dh;
                const T *x = y + at, *sc = s.data() + head * dh;
                const T r = inverse_rms(x, dh, eps);
                if (!g_out) {
                    for (i64 e = 0; e < dh; ++e) out[c + e] = x[e] * r * weight[e] * sc[e];
                    continue;
                }
                const T* g = g_out + c;
                for (i64 e = 0; e < dh; ++e) {
                    g_logits[c + e] = g[e] * x[e] * r * weight[e] * sc[e] * (T(1) - sc[e]);
                    gated[e] = g[e] * sc[e];
                }
                rms_norm_backward(x, weight, r, gated.data(), dh, g_y + at, sums);
            }
        }
    }
};

// Flush subnormals to zero while a job runs on this thread: the decay coefficients reach e^-80 by design, and
// their products with small signals fall below float's normal range, where every operation costs ~100 cycles.
// Values that small are far below any tolerance here; the thread's previous mode is restored afterwards.
template <typename Job>
void run_flushing_subnormals(const Job& job, i64 lo, i64 hi) {
#if defined(__SSE__)
    const unsigned mode = _mm_getcsr();
    _mm_setcsr(mode | 0x8040);  // FTZ | DAZ
    job.run(lo, hi);
    _mm_setcsr(mode);
#else
    job.run(lo, hi);
#endif
}

// The pairs are shared out over OpenMP threads. Loaded into a process that runs torch, this library binds to
// torch's own libgomp (same soname), so the work runs on the thread pool torch keeps warm instead of competing
// with its spinning workers for the cores.
template <typename Job>
void over_pairs(const Job& job, i64 pairs, i64 threads) {
    threads = threads < 1 ? 1 : (threads > pairs ? pairs : threads);
#pragma omp parallel num_threads(threads)
    {
        const i64 w = omp_get_thread_num(), n = omp_get_num_threads();
        run_flushing_subnormals(job, w * pairs / n, (w + 1) * pairs / n);
    }
}

// MAC's read of a segment (models/mac.py, MemoryRead): each pair's queries through the memory MLP at fixed
// weights, z = M(q) (x_0 = q, z_l = x_l W_l, x_{l+1} = silu(z_l)), each token's read RMS-normed with a weight
// and gated: out[b, t, h dh + e] = z_e r_t w_e gate[b, t, h dh + e], r_t = (mean_e z_e^2 + eps)^-1/2, tokens
// major as the output projection takes them. The backward (g_out given) recomputes the MLP, and gives g_q, the
// weights' gradients g_W_l = x_l^T g_z_l, g_gate, and sums the norm weight's gradient into partial [threads, dh].
// Layouts: q [P, c, d_0], weights [P, d_l, d_{l+1}], gate and out [B, c, H dh] with P = B H.
template <typename T>
struct MemoryReadJob {
    const Dims& d;  // depth, widths, pairs and c (the tokens); m and subs unused
    i64 heads;
    T eps;
    const T* q;
    const T* const* weights;
    const T *w_norm, *gate;
    T* out;           // forward
    const T* g_out;   // backward: the incoming gradient
    T *g_q, *g_gate, *partial;
    T* const* g_weights;

    void run(i64 lo, i64 hi) const {
        const i64 L = d.depth, c = d.c, dh = d.cols(L - 1), D = heads * dh;
        std::vector<std::vector<T>> xs(L), zs(L);  // each layer's input (x_0 = q read in place) and pre-activation
        std::vector<T> gz, gx, wt(d.max_width() * d.max_width()), s, gated(d.cols(L - 1));
        for (i64 l = 0; l < L; ++l) {
            if (l) xs[l].resize(c * d.rows(l));
            zs[l].resize(c * d.cols(l));
        }
        gz.resize(c * d.max_width());
        gx.resize(c * d.max_width());
        s.resize(c * d.max_width());
        T* sums = g_out ? partial + omp_get_thread_num() * dh : nullptr;
        for (i64 p = lo; p < hi; ++p) {
            const i64 b = p / heads, h = p % heads;
            const T* x = q + p * c * d.rows(0);
            for (i64 l = 0; l < L; ++l) {
                const i64 R = d.rows(l), C = d.cols(l);
                gemm(x, R, 1, weights[l] + p * R * C, zs[l].data(), c, R, C, T(1), false);
                if (l + 1 == L) break;
                sigmoid(zs[l].data(), s.data(), c * C);
                for (i64 e = 0; e < c * C; ++e) xs[l + 1][e] = zs[l][e] * s[e];
                x = xs[l + 1].data();
            }
            const T* z = zs[L - 1].data();
            for (i64 t = 0; t < c; ++t) {
                const T* zt = z + t * dh;
                const T r = inverse_rms(zt, dh, eps);
                const i64 at = (b * c + t) * D + h * dh;
                if (!g_out) {
                    for (i64 e = 0; e < dh; ++e) out[at + e] = zt[e] * r * w_norm[e] * gate[at + e];
                    continue;
                }
                for (i64 e = 0; e < dh; ++e) {
                    g_gate[at + e] = g_out[at + e] * zt[e] * r * w_norm[e];
                    gated[e] = g_out[at + e] * gate[at + e];
                }
                rms_norm_backward(zt, w_norm, r, gated.data(), dh, gz.data() + t * dh, sums);
            }
            if (!g_out) continue;
            for (i64 l = L - 1; l >= 0; --l) {  // gz holds g_z_l [c, C]
                const i64 R = d.rows(l), C = d.cols(l);
                const T* xl = l ? xs[l].data() : q + p * c * d.rows(0);
                gemm(xl, 1, R, gz.data(), g_weights[l] + p * R * C, R, c, C, T(1), false);  // x_l^T g_z_l
                transpose(weights[l] + p * R * C, wt.data(), R, C);
                T* target = l ? gx.data() : g_q + p * c * R;
                gemm(gz.data(), C, 1, wt.data(), target, c, C, R, T(1), false);  // g_x_l = g_z_l W_l^T
                if (!l) break;
                const T* zp = zs[l - 1].data();  // x_l = silu(z_{l-1}): silu' = s (1 + z (1 - s))
                sigmoid(zp, s.data(), c * R);
                for (i64 e = 0; e < c * R; ++e) gz[e] = gx[e] * s[e] * (T(1) + zp[e] * (T(1) - s[e]));
            }
        }
    }
};

// The rest of MAC's read, over rows i = b c + t of tokens: h = u W_out^T, k = h W_k^T, v = h W_v^T (weights
// given transposed, [D, D] row-major each), k rotated per attention head (half-split pairs as models.layers.rotate,
// tables cos, sin [c, dha / 2]; an odd last channel stays), both laid out [B, A, c, dha]. The backward (g_kh given)
// takes the gradients of k_h and v_h back to g_h and g_u = g_h W_out, token major, for WeightGradients and the read.
template <typename T>
struct ReadProjection {
    i64 c, D, A;
    const T *cos, *sin;
    const T *u, *w_out_t, *w_k_t, *w_v_t;
    T *h, *kh, *vh;              // forward outputs
    const T *g_kh, *g_vh;        // backward
    T *g_k, *g_v, *g_h, *g_u;    // backward outputs, token major [B c, D]

    void rotate(T* x, const T* cs, const T* sn, bool inverse) const {  // one token's heads, in place
        const i64 dha = D / A, half = dha / 2;
        for (i64 a = 0; a < A; ++a) {
            T* y = x + a * dha;
            for (i64 e = 0; e < half; ++e) {
                const T x1 = y[e], x2 = y[half + e], co = cs[e], si = inverse ? -sn[e] : sn[e];
                y[e] = x1 * co - x2 * si;
                y[half + e] = x1 * si + x2 * co;
            }
        }
    }
    // token i's head a in [B, A, c, dha]
    i64 at(i64 i, i64 a) const { return (((i / c) * A + a) * c + i % c) * (D / A); }

    void run(i64 lo, i64 hi) const {
        const i64 rows = hi - lo, dha = D / A;
        std::vector<T> k(rows * D), v(rows * D), wt(D * D);
        if (!g_kh) {
            gemm(u + lo * D, D, 1, w_out_t, h + lo * D, rows, D, D, T(1), false);
            gemm(h + lo * D, D, 1, w_k_t, k.data(), rows, D, D, T(1), false);
            gemm(h + lo * D, D, 1, w_v_t, v.data(), rows, D, D, T(1), false);
            for (i64 i = lo; i < hi; ++i) {
                T* ki = k.data() + (i - lo) * D;
                rotate(ki, cos + (i % c) * (dha / 2), sin + (i % c) * (dha / 2), false);
                for (i64 a = 0; a < A; ++a) {
                    std::memcpy(kh + at(i, a), ki + a * dha, dha * sizeof(T));
                    std::memcpy(vh + at(i, a), v.data() + (i - lo) * D + a * dha, dha * sizeof(T));
                }
            }
            return;
        }
        for (i64 i = lo; i < hi; ++i) {
            T *gk = g_k + i * D, *gv = g_v + i * D;
            for (i64 a = 0; a < A; ++a) {
                std::memcpy(gk + a * dha, g_kh + at(i, a), dha * sizeof(T));
                std::memcpy(gv + a * dha, g_vh + at(i, a), dha * sizeof(T));
            }
            rotate(gk, cos + (i % c) * (dha / 2), sin + (i % c) * (dha / 2), true);  // a rotation's transpose
        }
        transpose(w_k_t, wt.data(), D, D);  // g_h = g_k W_k + g_v W_v
        gemm(g_k + lo * D, D, 1, wt.data(), g_h + lo * D, rows, D, D, T(1), false);
        transpose(w_v_t, wt.data(), D, D);
        gemm(g_v + lo * D, D, 1, wt.data(), g_h + lo * D, rows, D, D, T(1), true);
        transpose(w_out_t, wt.data(), D, D);
        gemm(g_h + lo * D, D, 1, wt.data(), g_u + lo * D, rows, D, D, T(1), false);
    }
};

// Gradients of weights given transposed (y = x W_t, W_t [D, cols]) summed over `tokens` rows: g_W_t = x^T g_y for
// `count` pairs (x [tokens, D], g_y [tokens, cols] row-major), each thread computing rows [lo, hi) of every one.
template <typename T>
struct WeightGradients {
    i64 tokens, D;
    int count;
    const T* x[6];
    const T* g[6];
    i64 cols[6];
    T* out[6];

    void run(i64 lo, i64 hi) const {
        for (int j = 0; j < count; ++j)
            gemm(x[j] + lo, 1, D, g[j], out[j] + lo * cols[j], hi - lo, tokens, cols[j], T(1), false);
    }
};

// ---------------------------------------------------------------------------------------------------------
// NeuralMemory.write in one call each way, for a call that is one group of chunks (compiled.CompiledWrite): the
// conv and norms, the gate activations, the coefficients and the scan, then in the backward their backwards in
// reverse. The jobs are the ones above; composed here, a call costs one crossing from Python instead of four
// with their tensors' allocations, views and checks, which at MAC's 64-token segments cost more than the loops.
// What the backward reads is recorded in one workspace that the forward fills, laid out by WriteRecord.

// The record: what the backward reads, carved from `base` in this order (base null: only the size is counted),
// and when recording the state before every sub-chunk and the keys' z and d, given as separate buffers `parts`
// (path per layer [P, m s + 1, 2 R, C], then z per hidden layer and d per layer [P, N, C]): allocated apart, each
// stays below the size from which glibc maps every allocation afresh, whose page faults cost as much as the scan.
// Inference keeps the end state in the record instead.
template <typename T>
struct WriteRecord {
    T *q, *k, *v, *le, *lk, *th, *scales, *G, *BBC, *mix, *write;
    std::vector<T*> start, path, zs, ds, end;
    i64 size = 0;

    WriteRecord(const Dims& d, T* base, T* const* parts, bool recording)
        : start(d.depth), path(d.depth, nullptr), zs(d.depth, nullptr), ds(d.depth, nullptr), end(d.depth, nullptr) {
        const i64 P = d.pairs, n = d.m * d.c, U = d.m * d.subs, r = d.c / d.subs, L = d.depth;
        auto take = [&](i64 count) {
            T* at = base ? base + size : nullptr;
            size += count;
            return at;
        };
        q = take(P * n * d.rows(0));
        k = take(P * n * d.rows(0));
        v = take(P * n * d.cols(L - 1));
        le = take(P * n);
        lk = take(P * n);
        th = take(P * n);
        scales = recording ? take(P * n) : nullptr;
        G = take(P * U * r * r);
        BBC = take(P * U * r * 2);
        mix = take(P * U * 4);
        write = take(P * U * 2 * r);
        for (i64 l = 0; l < L; ++l) {
            start[l] = take(P * 2 * d.numel(l));
            if (!recording) {
                end[l] = take(P * 2 * d.numel(l));
            } else if (parts) {
                path[l] = parts[l];
                if (l + 1 < L) zs[l] = parts[L + l];
                ds[l] = parts[2 * L - 1 + l];
            }
        }
    }
};

// The gates per token and head from their logits [B, N, 3 H] (theta, eta, alpha per head) to the scan's layout
// [B, H, N]: th = 2 max_lr sigmoid(.) (the inner loss's factor 2 folded in, as chunked_scan does), le = log
// sigmoid(.) (no_momentum when momentum is off) and lk = log sigmoid(-.) (0 without forgetting), as
// compiled.gate_activations computes them. The backward (g_logits given) reads the gradients of th, le, lk
// from the same three pointers and writes the logits'.
template <typename T>
struct GateActivations {
    i64 n, heads;
    T max_lr, no_momentum;
    bool momentum, forgetting;
    const T* logits;
    T *th, *le, *lk;
    T* g_logits;

    static T logistic(T x) { return T(1) / (T(1) + std::exp(-x)); }
    static T log_logistic(T x) { return (x < T(0) ? x : T(0)) - std::log1p(std::exp(-std::abs(x))); }

    void run(i64 lo, i64 hi) const {  // over tokens i = b N + t
        for (i64 i = lo; i < hi; ++i) {
            const i64 b = i / n, t = i % n;
            const T* x = logits + i * 3 * heads;
            for (i64 h = 0; h < heads; ++h) {
                const i64 at = (b * heads + h) * n + t;
                const T s = logistic(x[h]), eta = x[heads + h], alpha = x[2 * heads + h];
                if (!g_logits) {
                    th[at] = T(2) * max_lr * s;
                    le[at] = momentum ? log_logistic(eta) : no_momentum;
                    lk[at] = forgetting ? log_logistic(-alpha) : T(0);
                    continue;
                }
                T* g = g_logits + i * 3 * heads;
                g[h] = th[at] * T(2) * max_lr * s * (T(1) - s);
                g[heads + h] = momentum ? le[at] * (T(1) - logistic(eta)) : T(0);  // d log sigmoid(x) = sigmoid(-x)
                g[2 * heads + h] = forgetting ? -lk[at] * logistic(alpha) : T(0);
            }
        }
    }
};

// Per layer, the weights and momentum [P, R, C] each <-> a pair's state (weights over momentum) at
// joined[l] + p * stride + offset. `split`: state -> weights, momentum; else the other way, a null source
// (an unused output's gradient) giving zeros.
template <typename T>
struct States {
    const Dims& d;
    T* const* joined;
    i64 stride, offset;  // in units of the layer's state size 2 R C
    const T* const* from_weights;
    const T* const* from_momentum;
    T* const* to_weights;
    T* const* to_momentum;

    void run(i64 lo, i64 hi) const {
        for (i64 p = lo; p < hi; ++p)
            for (i64 l = 0; l < d.depth; ++l) {
                const i64 n = d.numel(l);
                T* state = joined[l] + (p * stride + offset) * 2 * n;
                for (i64 half = 0; half < 2; ++half) {
                    T* part = state + half * n;
                    if (to_weights) {
                        std::memcpy((half ? to_momentum : to_weights)[l] + p * n, part, n * sizeof(T));
                        continue;
                    }
                    const T* source = half ? from_momentum[l] : from_weights[l];
                    if (source)
                        std::memcpy(part, source + p * n, n * sizeof(T));
                    else
                        std::memset(part, 0, n * sizeof(T));
                }
            }
    }
};

// Scratch that the jobs overwrite whole. A std::vector would zero it first: one serial pass over tens of
// megabytes at training batch sizes, longer than the jobs themselves.
template <typename T>
class Buffer {
  public:
    explicit Buffer(i64 n) : data_(new T[n]) {}
    T* data() const { return data_.get(); }
    T& operator[](i64 i) const { return data_[i]; }

  private:
    std::unique_ptr<T[]> data_;
};

// x = -x over [lo, hi) of `per` elements per unit
template <typename T>
struct Negate {
    T* x;
    i64 per;

    void run(i64 lo, i64 hi) const {
        for (i64 e = lo * per; e < hi * per; ++e) x[e] = -x[e];
    }
};

template <typename T>
i64 write_record_size(const Dims& d, bool recording) {
    return WriteRecord<T>(d, nullptr, nullptr, recording).size;
}

template <typename T>
void write_forward(const Dims& d, i64 batch, i64 heads, i64 kernel, const T* tail, const T* p, const T* conv_w,
                   const T* conv_b, const T* logits, T max_lr, bool momentum, bool forgetting, T no_momentum,
                   const T* const* weights, const T* const* momentum_state, const T* const* anchor, T bound,
                   T* record, T* const* parts, bool recording, T* y, T* const* end_weights, T* const* end_momentum,
                   i64 threads) {
    const WriteRecord<T> w(d, record, parts, recording);
    const i64 n = d.m * d.c, r = d.c / d.subs, dh = d.rows(0), P = d.pairs, U = d.m * d.subs;
    T* const qkv[3] = {w.q, w.k, w.v};
    over_pairs(ConvActivateNormalise<T>{n, heads, dh, kernel, tail, p, conv_w, conv_b, qkv, nullptr, nullptr,
                                        nullptr},
               batch * n, threads);
    over_pairs(GateActivations<T>{n, heads, max_lr, no_momentum, momentum, forgetting, logits, w.th, w.le, w.lk,
                                  nullptr},
               batch * n, threads);
    over_pairs(Coefficients<T>{r, w.le, w.lk, w.th, w.G, w.BBC, w.mix, w.write, nullptr, nullptr, nullptr, nullptr,
                               nullptr, nullptr, nullptr},
               P * U, threads);
    over_pairs(States<T>{d, w.start.data(), 1, 0, weights, momentum_state, nullptr, nullptr}, P, threads);
    over_pairs(Forward<T>{d, w.start.data(), anchor, w.k, w.v, w.write, w.mix, recording ? w.path.data() : nullptr,
                          w.zs.data(), w.ds.data(), w.q, w.G, w.BBC, y, recording ? nullptr : w.end.data(), bound,
                          recording && bound > 0 ? w.scales : nullptr},
               P, threads);
    if (recording)
        over_pairs(States<T>{d, w.path.data(), U + 1, U, nullptr, nullptr, end_weights, end_momentum}, P, threads);
    else
        over_pairs(States<T>{d, w.end.data(), 1, 0, nullptr, nullptr, end_weights, end_momentum}, P, threads);
}

template <typename T>
void write_backward(const Dims& d, i64 batch, i64 heads, i64 kernel, const T* tail, const T* p, const T* conv_w,
                    const T* conv_b, const T* logits, T max_lr, bool momentum, bool forgetting,
                    const T* const* anchor, T bound, T* record, T* const* parts, const T* g_y,
                    const T* const* g_end_weights,
                    const T* const* g_end_momentum, T* g_tail, T* g_p, T* g_conv_w, T* g_conv_b, T* g_logits,
                    T* const* g_weights, T* const* g_momentum, T* const* g_anchor, i64 threads) {
    const WriteRecord<T> w(d, record, parts, true);
    const i64 n = d.m * d.c, r = d.c / d.subs, dh = d.rows(0), P = d.pairs, U = d.m * d.subs, L = d.depth;
    const i64 channels = 3 * heads * dh, used = threads < 1 ? 1 : threads;
    std::vector<Buffer<T>> g_end, g_states;
    std::vector<T*> g_end_at(L), g_states_at(L);
    for (i64 l = 0; l < L; ++l) {
        g_end_at[l] = g_end.emplace_back(P * 2 * d.numel(l)).data();
        g_states_at[l] = g_states.emplace_back(P * 2 * d.numel(l)).data();
    }
    const Buffer<T> g_k(P * n * dh), g_v(P * n * d.cols(L - 1)), g_q(P * n * dh), g_G(P * U * r * r),
        g_BBC(P * U * r * 2), g_gates(3 * P * n), g_a(batch * n * channels);
    std::vector<T> g_write(P * U * 2 * r, T(0)), g_mix(P * U * 4, T(0)), partial(used * (kernel + 1) * channels, T(0));
    T *g_th = g_gates.data(), *g_le = g_th + P * n, *g_lk = g_le + P * n;
    over_pairs(States<T>{d, g_end_at.data(), 1, 0, g_end_weights, g_end_momentum, nullptr, nullptr}, P, threads);
    over_pairs(Backward<T>{d, anchor, w.k, w.write, w.mix, w.path.data(), w.zs.data(), w.ds.data(), w.q, w.G, w.BBC,
                           g_y, g_end_at.data(), g_k.data(), g_v.data(), g_write.data(), g_mix.data(), g_q.data(),
                           g_G.data(), g_BBC.data(), g_states_at.data(), g_anchor, bound,
                           bound > 0 ? w.scales : nullptr},
               P, threads);
    over_pairs(Negate<T>{g_v.data(), n * d.cols(L - 1)}, P, threads);  // the backward gives that of M(k) - v
    over_pairs(Coefficients<T>{r, w.le, w.lk, w.th, nullptr, nullptr, nullptr, nullptr, g_G.data(), g_BBC.data(),
                               g_mix.data(), g_write.data(), g_le, g_lk, g_th},
               P * U, threads);
    over_pairs(GateActivations<T>{n, heads, max_lr, T(0), momentum, forgetting, logits, g_th, g_le, g_lk, g_logits},
               batch * n, threads);
    const T* const g_qkv[3] = {g_q.data(), g_k.data(), g_v.data()};
    over_pairs(ConvActivateNormalise<T>{n, heads, dh, kernel, tail, p, conv_w, conv_b, nullptr, g_qkv, g_a.data(),
                                        partial.data()},
               batch * n, threads);
    over_pairs(ConvInputGradient<T>{n, channels, kernel, conv_w, g_a.data(), g_tail, g_p}, batch * (kernel - 1 + n),
               threads);
    for (i64 x = 0; x < (kernel + 1) * channels; ++x) {  // the threads' sums: the weight's gradient, then the bias's
        T sum = 0;
        for (i64 t = 0; t < used; ++t) sum += partial[t * (kernel + 1) * channels + x];
        (x < kernel * channels ? g_conv_w[x] : g_conv_b[x - kernel * channels]) = sum;
    }
    over_pairs(States<T>{d, g_states_at.data(), 1, 0, nullptr, nullptr, g_weights, g_momentum}, P, threads);
}

// ---------------------------------------------------------------------------------------------------------
// MAC's write of a segment (models/mac.py, SegmentWrite): from the attention's output a [B, N, D] through the
// output projection y = a W_o^T, the write norm n = y rsqrt(mean(y^2) + eps) w_n, the memory's projections
// p = n W_qkv^T and gate logits n W_g^T + b_g, to the write above. Weights given transposed: W_o^T [D, D], W_qkv^T
// as three [D, D] blocks (q, k, v), W_g^T [D, 3 H]. Over rows i = b N + t of tokens; the backward (g_p given)
// takes the gradients of p and of the logits (and of y and n where they are used) back to a.
template <typename T>
struct WriteInput {
    i64 D, G, total_rows;  // width, gate logits per token (3 H), rows of all threads (g_p's block size)
    T eps;
    const T *a, *wo_t, *wn, *wq_t[3], *wg_t, *bg;
    T *y, *n, *p, *logits;                    // forward outputs [rows, D], [rows, D], [rows, 3 D], [rows, G]
    const T *g_p, *g_logits, *g_y, *g_n;      // backward: g_p [3][rows, D] blocks; g_y, g_n may be null
    T *g_ys, *g_a, *partial;                  // backward outputs: the gradient at y [rows, D], at a; w_n's sums

    void run(i64 lo, i64 hi) const {
        const i64 rows = hi - lo;
        std::vector<T> block(rows * D), wt(D * (D > G ? D : G));
        if (!g_p) {
            gemm(a + lo * D, D, 1, wo_t, y + lo * D, rows, D, D, T(1), false);
            for (i64 i = lo; i < hi; ++i) {
                const T *yi = y + i * D, r = inverse_rms(yi, D, eps);
                for (i64 e = 0; e < D; ++e) n[i * D + e] = yi[e] * r * wn[e];
            }
            for (int j = 0; j < 3; ++j) {
                gemm(n + lo * D, D, 1, wq_t[j], block.data(), rows, D, D, T(1), false);
                for (i64 i = 0; i < rows; ++i)
                    std::memcpy(p + (lo + i) * 3 * D + j * D, block.data() + i * D, D * sizeof(T));
            }
            for (i64 i = lo; i < hi; ++i) std::memcpy(logits + i * G, bg, G * sizeof(T));
            gemm(n + lo * D, D, 1, wg_t, logits + lo * G, rows, D, G, T(1), true);
            return;
        }
        std::vector<T> gn(rows * D, T(0));  // the gradient at n: from p, the logits and n's own users
        for (int j = 0; j < 3; ++j) {
            transpose(wq_t[j], wt.data(), D, D);
            gemm(g_p + (j * total_rows + lo) * D, D, 1, wt.data(), gn.data(), rows, D, D, T(1), true);
        }
        transpose(wg_t, wt.data(), D, G);
        gemm(g_logits + lo * G, G, 1, wt.data(), gn.data(), rows, G, D, T(1), true);
        T* sums = partial + omp_get_thread_num() * D;
        for (i64 i = lo; i < hi; ++i) {
            const T* yi = y + i * D;
            T* gi = gn.data() + (i - lo) * D;
            if (g_n)
                for (i64 e = 0; e < D; ++e) gi[e] += g_n[i * D + e];
            T* gy = g_ys + i * D;
            rms_norm_backward(yi, wn, inverse_rms(yi, D, eps), gi, D, gy, sums);
            if (g_y)
                for (i64 e = 0; e < D; ++e) gy[e] += g_y[i * D + e];
        }
        transpose(wo_t, wt.data(), D, D);
        gemm(g_ys + lo * D, D, 1, wt.data(), g_a + lo * D, rows, D, D, T(1), false);
    }
};

template <typename T>
void mac_write_forward(const Dims& d, i64 batch, i64 heads, i64 kernel, const T* a, const T* wo_t, const T* wn, T eps,
                       const T* const* wq_t, const T* wg_t, const T* bg, const T* tail, const T* conv_w,
                       const T* conv_b, T max_lr, bool momentum, bool forgetting, T no_momentum,
                       const T* const* weights, const T* const* momentum_state, const T* const* anchor, T bound,
                       T* record, T* const* parts, bool recording, T* y, T* normed, T* p, T* logits, T* reads,
                       T* const* end_weights,
                       T* const* end_momentum, i64 threads) {
    const i64 rows = batch * d.m * d.c, D = heads * d.rows(0), G = 3 * heads;
    over_pairs(WriteInput<T>{D, G, rows, eps, a, wo_t, wn, {wq_t[0], wq_t[1], wq_t[2]}, wg_t, bg, y, normed, p, logits,
                             nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr},
               rows, threads);
    write_forward<T>(d, batch, heads, kernel, tail, p, conv_w, conv_b, logits, max_lr, momentum, forgetting,
                     no_momentum, weights, momentum_state, anchor, bound, record, parts, recording, reads, end_weights,
                     end_momentum, threads);
}

template <typename T>
void mac_write_backward(const Dims& d, i64 batch, i64 heads, i64 kernel, const T* a, const T* wo_t, const T* wn,
                        T eps, const T* const* wq_t, const T* wg_t, const T* tail, const T* conv_w, const T* conv_b,
                        T max_lr, bool momentum, bool forgetting, const T* const* anchor, T bound, T* record,
                        T* const* parts,
                        const T* y, const T* normed, const T* p, const T* logits, const T* g_reads,
                        const T* const* g_end_weights, const T* const* g_end_momentum, const T* g_y, const T* g_n,
                        const T* g_p_out, T* g_a, T* g_wo_t, T* g_wn, T* const* g_wq_t, T* g_wg_t, T* g_bg, T* g_tail,
                        T* g_conv_w, T* g_conv_b, T* const* g_weights, T* const* g_momentum, T* const* g_anchor,
                        i64 threads) {
    const i64 rows = batch * d.m * d.c, D = heads * d.rows(0), G = 3 * heads, used = threads < 1 ? 1 : threads;
    const Buffer<T> g_p(rows * 3 * D), g_logits(rows * G), blocks(3 * rows * D), g_ys(rows * D);
    std::vector<T> partial(used * D, T(0));
    write_backward<T>(d, batch, heads, kernel, tail, p, conv_w, conv_b, logits, max_lr, momentum, forgetting, anchor,
                      bound, record, parts, g_reads, g_end_weights, g_end_momentum, g_tail, g_p.data(), g_conv_w,
                      g_conv_b,
                      g_logits.data(), g_weights, g_momentum, g_anchor, threads);
    for (i64 i = 0; i < rows; ++i)  // p's gradient, from the write and from p's own users, as three [rows, D] blocks
        for (int j = 0; j < 3; ++j)
            for (i64 e = 0; e < D; ++e)
                blocks[(j * rows + i) * D + e] =
                    g_p[i * 3 * D + j * D + e] + (g_p_out ? g_p_out[i * 3 * D + j * D + e] : T(0));
    over_pairs(WriteInput<T>{D, G, rows, eps, a, wo_t, wn, {wq_t[0], wq_t[1], wq_t[2]}, wg_t, nullptr,
                             const_cast<T*>(y), nullptr, nullptr, nullptr, blocks.data(), g_logits.data(), g_y, g_n,
                             g_ys.data(), g_a, partial.data()},
               rows, threads);  // (the backward only reads y)
    // W_t gradients: x^T g over all rows, for the output projection (a, g_y), the three blocks and the gates (n, .)
    over_pairs(WeightGradients<T>{rows, D, 5, {a, normed, normed, normed, normed},
                                  {g_ys.data(), blocks.data(), blocks.data() + rows * D, blocks.data() + 2 * rows * D,
                                   g_logits.data()},
                                  {D, D, D, D, G}, {g_wo_t, g_wq_t[0], g_wq_t[1], g_wq_t[2], g_wg_t}},
               D, threads);
    for (i64 e = 0; e < D; ++e) {
        T sum = 0;
        for (i64 t = 0; t < used; ++t) sum += partial[t * D + e];
        g_wn[e] = sum;
    }
    for (i64 k = 0; k < G; ++k) {
        T sum = 0;
        for (i64 i = 0; i < rows; ++i) sum += g_logits[i * G + k];
        g_bg[k] = sum;
    }
}

}  // namespace

#define TITANS_SCAN_EXPORTS(T, SUFFIX)                                                                             \
    extern "C" void scan_forward_##SUFFIX(i64 depth, i64 m, i64 subs, i64 pairs, i64 c, const i64* widths,         \
                                          const T* const* start, const T* const* anchor, const T* k, const T* v,   \
                                          const T* write, const T* mix, T* const* path, T* const* zs,              \
                                          T* const* ds, const T* q, const T* G, const T* BBC, T* y,                \
                                          T* const* end, T bound, T* scales, i64 threads) {                        \
        const Dims d{depth, m, subs, pairs, c, widths};                                                            \
        over_pairs(Forward<T>{d, start, anchor, k, v, write, mix, path, zs, ds, q, G, BBC, y, end, bound, scales}, \
                   pairs, threads);                                                                                \
    }                                                                                                              \
    extern "C" void scan_backward_##SUFFIX(                                                                        \
        i64 depth, i64 m, i64 subs, i64 pairs, i64 c, const i64* widths, const T* const* anchor, const T* k,       \
        const T* write, const T* mix, const T* const* path, const T* const* zs, const T* const* ds, const T* q,    \
        const T* G, const T* BBC, const T* g_y, const T* const* g_end, T* g_k, T* g_dout, T* g_write, T* g_mix,    \
        T* g_q, T* g_G, T* g_BBC, T* const* g_states, T* const* g_anchor, T bound, const T* scales, i64 threads) { \
        const Dims d{depth, m, subs, pairs, c, widths};                                                            \
        over_pairs(Backward<T>{d, anchor, k, write, mix, path, zs, ds, q, G, BBC, g_y, g_end, g_k, g_dout,         \
                               g_write, g_mix, g_q, g_G, g_BBC, g_states, g_anchor, bound, scales},                \
                   pairs, threads);                                                                                \
    }

#define TITANS_COEFFICIENT_EXPORTS(T, SUFFIX)                                                                      \
    extern "C" void coefficients_##SUFFIX(i64 units, i64 r, const T* le, const T* lk, const T* th, T* G, T* BBC,   \
                                          T* mix, T* write, i64 threads) {                                         \
        over_pairs(Coefficients<T>{r, le, lk, th, G, BBC, mix, write, nullptr, nullptr, nullptr, nullptr, nullptr, \
                                   nullptr, nullptr},                                                              \
                   units, threads);                                                                                \
    }                                                                                                              \
    extern "C" void coefficients_backward_##SUFFIX(i64 units, i64 r, const T* le, const T* lk, const T* th,        \
                                                   const T* gG, const T* gBBC, const T* gmix, const T* gwrite,     \
                                                   T* gle, T* glk, T* gth, i64 threads) {                          \
        over_pairs(Coefficients<T>{r, le, lk, th, nullptr, nullptr, nullptr, nullptr, gG, gBBC, gmix, gwrite, gle, \
                                   glk, gth},                                                                      \
                   units, threads);                                                                                \
    }

TITANS_COEFFICIENT_EXPORTS(float, f32)
TITANS_COEFFICIENT_EXPORTS(double, f64)

TITANS_SCAN_EXPORTS(float, f32)
TITANS_SCAN_EXPORTS(double, f64)

#define TITANS_POINTWISE_EXPORTS(T, SUFFIX)                                                                        \
    extern "C" void conv_activate_normalise_##SUFFIX(i64 batch, i64 n, i64 heads, i64 dh, i64 kernel,              \
                                                     const T* tail, const T* p, const T* w, const T* bias,         \
                                                     T* const* out, i64 threads) {                                 \
        over_pairs(ConvActivateNormalise<T>{n, heads, dh, kernel, tail, p, w, bias, out, nullptr, nullptr,         \
                                            nullptr},                                                              \
                   batch * n, threads);                                                                            \
    }                                                                                                              \
    extern "C" void conv_activate_normalise_backward_##SUFFIX(                                                     \
        i64 batch, i64 n, i64 heads, i64 dh, i64 kernel, const T* tail, const T* p, const T* w, const T* bias,     \
        const T* const* g_out, T* g_a, T* partial, T* g_tail, T* g_p, i64 threads) {                               \
        over_pairs(ConvActivateNormalise<T>{n, heads, dh, kernel, tail, p, w, bias, nullptr, g_out, g_a, partial}, \
                   batch * n, threads);                                                                            \
        over_pairs(ConvInputGradient<T>{n, 3 * heads * dh, kernel, w, g_a, g_tail, g_p}, batch * (kernel - 1 + n), \
                   threads);                                                                                       \
    }                                                                                                              \
    extern "C" void norm_gate_##SUFFIX(i64 batch, i64 n, i64 heads, i64 dh, T eps, const T* y, const T* weight,    \
                                       const T* logits, T* out, i64 threads) {                                     \
        over_pairs(NormGate<T>{n, heads, dh, eps, y, weight, logits, out, nullptr, nullptr, nullptr, nullptr},     \
                   batch * n, threads);                                                                            \
    }                                                                                                              \
    extern "C" void norm_gate_backward_##SUFFIX(i64 batch, i64 n, i64 heads, i64 dh, T eps, const T* y,            \
                                                const T* weight, const T* logits, const T* g_out, T* g_y,          \
                                                T* g_logits, T* partial, i64 threads) {                            \
        over_pairs(NormGate<T>{n, heads, dh, eps, y, weight, logits, nullptr, g_out, g_y, g_logits, partial},      \
                   batch * n, threads);                                                                            \
    }

TITANS_POINTWISE_EXPORTS(float, f32)
TITANS_POINTWISE_EXPORTS(double, f64)

#define TITANS_WRITE_EXPORTS(T, SUFFIX)                                                                            \
    extern "C" i64 write_record_size_##SUFFIX(i64 depth, i64 m, i64 subs, i64 pairs, i64 c, const i64* widths,     \
                                              i64 recording) {                                                     \
        return write_record_size<T>(Dims{depth, m, subs, pairs, c, widths}, recording != 0);                       \
    }                                                                                                              \
    extern "C" void write_forward_##SUFFIX(                                                                        \
        i64 depth, i64 m, i64 subs, i64 pairs, i64 c, const i64* widths, i64 batch, i64 heads, i64 kernel,         \
        const T* tail, const T* p, const T* conv_w, const T* conv_b, const T* logits, T max_lr, i64 momentum,      \
        i64 forgetting, T no_momentum, const T* const* weights, const T* const* momentum_state,                    \
        const T* const* anchor, T bound, T* record, T* const* parts, i64 recording, T* y,                          \
        T* const* end_weights, T* const* end_momentum, i64 threads) {                                              \
        write_forward<T>(Dims{depth, m, subs, pairs, c, widths}, batch, heads, kernel, tail, p, conv_w, conv_b,    \
                         logits, max_lr, momentum != 0, forgetting != 0, no_momentum, weights, momentum_state,     \
                         anchor, bound, record, parts, recording != 0, y, end_weights, end_momentum, threads);     \
    }                                                                                                              \
    extern "C" void write_backward_##SUFFIX(                                                                       \
        i64 depth, i64 m, i64 subs, i64 pairs, i64 c, const i64* widths, i64 batch, i64 heads, i64 kernel,         \
        const T* tail, const T* p, const T* conv_w, const T* conv_b, const T* logits, T max_lr, i64 momentum,      \
        i64 forgetting, const T* const* anchor, T bound, T* record, T* const* parts, const T* g_y,                 \
        const T* const* g_end_weights,                                                                             \
        const T* const* g_end_momentum, T* g_tail, T* g_p, T* g_conv_w, T* g_conv_b, T* g_logits,                  \
        T* const* g_weights, T* const* g_momentum, T* const* g_anchor, i64 threads) {                              \
        write_backward<T>(Dims{depth, m, subs, pairs, c, widths}, batch, heads, kernel, tail, p, conv_w, conv_b,   \
                          logits, max_lr, momentum != 0, forgetting != 0, anchor, bound, record, parts, g_y,       \
                          g_end_weights, g_end_momentum, g_tail, g_p, g_conv_w, g_conv_b, g_logits, g_weights,     \
                          g_momentum, g_anchor, threads);                                                          \
    }

TITANS_WRITE_EXPORTS(float, f32)
TITANS_WRITE_EXPORTS(double, f64)

#define TITANS_READ_EXPORTS(T, SUFFIX)                                                                             \
    extern "C" void mac_read_##SUFFIX(i64 depth, i64 pairs, i64 c, const i64* widths, i64 heads, i64 A, T eps,     \
                                      const T* q, const T* const* weights, const T* w_norm, const T* gate,         \
                                      const T* w_out_t, const T* w_k_t, const T* w_v_t, const T* cos,              \
                                      const T* sin, T* u, T* h, T* kh, T* vh, i64 threads) {                       \
        const Dims d{depth, 1, 1, pairs, c, widths};                                                               \
        const i64 D = heads * d.cols(depth - 1), tokens = pairs / heads * c;                                       \
        over_pairs(MemoryReadJob<T>{d, heads, eps, q, weights, w_norm, gate, u, nullptr, nullptr, nullptr,         \
                                    nullptr, nullptr},                                                             \
                   pairs, threads);                                                                                \
        over_pairs(ReadProjection<T>{c, D, A, cos, sin, u, w_out_t, w_k_t, w_v_t, h, kh, vh, nullptr, nullptr,     \
                                     nullptr, nullptr, nullptr, nullptr},                                          \
                   tokens, threads);                                                                               \
    }                                                                                                              \
    extern "C" void mac_read_backward_##SUFFIX(                                                                    \
        i64 depth, i64 pairs, i64 c, const i64* widths, i64 heads, i64 A, T eps, const T* q,                       \
        const T* const* weights, const T* w_norm, const T* gate, const T* w_out_t, const T* w_k_t,                 \
        const T* w_v_t, const T* cos, const T* sin, const T* u, const T* h, const T* g_kh, const T* g_vh,          \
        T* g_q, T* g_gate, T* partial, T* const* g_weights, T* g_w_out_t, T* g_w_k_t, T* g_w_v_t, i64 threads) {   \
        const Dims d{depth, 1, 1, pairs, c, widths};                                                               \
        const i64 D = heads * d.cols(depth - 1), tokens = pairs / heads * c;                                       \
        const Buffer<T> g_k(tokens * D), g_v(tokens * D), g_h(tokens * D), g_u(tokens * D);                        \
        over_pairs(ReadProjection<T>{c, D, A, cos, sin, u, w_out_t, w_k_t, w_v_t, nullptr, nullptr, nullptr, g_kh, \
                                     g_vh, g_k.data(), g_v.data(), g_h.data(), g_u.data()},                        \
                   tokens, threads);                                                                               \
        over_pairs(WeightGradients<T>{tokens, D, 3, {u, h, h}, {g_h.data(), g_k.data(), g_v.data()}, {D, D, D},    \
                                      {g_w_out_t, g_w_k_t, g_w_v_t}},                                              \
                   D, threads);                                                                                    \
        over_pairs(MemoryReadJob<T>{d, heads, eps, q, weights, w_norm, gate, nullptr, g_u.data(), g_q, g_gate,     \
                                    partial, g_weights},                                                           \
                   pairs, threads);                                                                                \
    }

TITANS_READ_EXPORTS(float, f32)
TITANS_READ_EXPORTS(double, f64)

#define TITANS_MAC_WRITE_EXPORTS(T, SUFFIX)                                                                        \
    extern "C" void mac_write_forward_##SUFFIX(                                                                    \
        i64 depth, i64 m, i64 subs, i64 pairs, i64 c, const i64* widths, i64 batch, i64 heads, i64 kernel,         \
        const T* a, const T* wo_t, const T* wn, T eps, const T* const* wq_t, const T* wg_t, const T* bg,           \
        const T* tail, const T* conv_w, const T* conv_b, T max_lr, i64 momentum, i64 forgetting, T no_momentum,    \
        const T* const* weights, const T* const* momentum_state, const T* const* anchor, T bound, T* record,       \
        T* const* parts, i64 recording, T* y, T* normed, T* p, T* logits, T* reads, T* const* end_weights,         \
        T* const* end_momentum, i64 threads) {                                                                     \
        mac_write_forward<T>(Dims{depth, m, subs, pairs, c, widths}, batch, heads, kernel, a, wo_t, wn, eps, wq_t, \
                             wg_t, bg, tail, conv_w, conv_b, max_lr, momentum != 0, forgetting != 0, no_momentum,  \
                             weights, momentum_state, anchor, bound, record, parts, recording != 0, y, normed, p,  \
                             logits, reads, end_weights, end_momentum, threads);                                   \
    }                                                                                                              \
    extern "C" void mac_write_backward_##SUFFIX(                                                                   \
        i64 depth, i64 m, i64 subs, i64 pairs, i64 c, const i64* widths, i64 batch, i64 heads, i64 kernel,         \
        const T* a, const T* wo_t, const T* wn, T eps, const T* const* wq_t, const T* wg_t, const T* tail,         \
        const T* conv_w, const T* conv_b, T max_lr, i64 momentum, i64 forgetting, const T* const* anchor, T bound, \
        T* record, T* const* parts, const T* y, const T* normed, const T* p, const T* logits, const T* g_reads,    \
        const T* const* g_end_weights, const T* const* g_end_momentum, const T* g_y, const T* g_n,                 \
        const T* g_p_out, T* g_a, T* g_wo_t, T* g_wn, T* const* g_wq_t, T* g_wg_t, T* g_bg, T* g_tail,             \
        T* g_conv_w, T* g_conv_b, T* const* g_weights, T* const* g_momentum, T* const* g_anchor, i64 threads) {    \
        mac_write_backward<T>(Dims{depth, m, subs, pairs, c, widths}, batch, heads, kernel, a, wo_t, wn, eps, wq_t, \
                              wg_t, tail, conv_w, conv_b, max_lr, momentum != 0, forgetting != 0, anchor, bound,   \
                              record, parts, y, normed, p, logits, g_reads, g_end_weights, g_end_momentum, g_y,    \
                              g_n, g_p_out, g_a, g_wo_t, g_wn, g_wq_t, g_wg_t, g_bg, g_tail, g_conv_w, g_conv_b,   \
                              g_weights, g_momentum, g_anchor, threads);                                           \
    }

TITANS_MAC_WRITE_EXPORTS(float, f32)
TITANS_MAC_WRITE_EXPORTS(double, f64)
