/* warmcast's native CPU kernel: the quantile head's pinball loss and its gradient, fused.
 *
 * Compiled on first use by models/native.py (which passes the sizes below as -D flags from
 * models/module.py's constants, so they are defined in one place) and called through ctypes;
 * models/module.py's _HeadPinball runs the same computation in torch where this is not
 * available. One pass over each user-step's head values instead of some thirty torch passes.
 *
 * Layout (float32, contiguous): raw [U, N, LEVELS, CELLS] the head output, level-major (CELLS =
 * HORIZONS x RESOURCES values per quantile level); y [U, N, CELLS] demand minus the last value;
 * w [U, N, HORIZONS] the weight of each horizon's target; tau [LEVELS] the quantile levels.
 * Output: sums [U, RESOURCES] (float64) = sum over steps, horizons and levels of
 * w * pinball(q, y), where q = the running sum over levels of the increments (level 0: raw[0]
 * minus the softplus gaps up to the median; level j > 0: softplus(raw[j])). With with_grad, raw
 * is overwritten by d(sums) / d(raw).
 */
#include <math.h>
#include <stdint.h>

#if !defined(WC_LEVELS) || !defined(WC_CELLS) || !defined(WC_MID) || !defined(WC_HORIZONS) || !defined(WC_RESOURCES)
#error "compile with -DWC_LEVELS=... -DWC_CELLS=... -DWC_MID=... -DWC_HORIZONS=... -DWC_RESOURCES=... (models/native.py)"
#endif
#define K WC_LEVELS
#define C WC_CELLS
#define MID WC_MID
#define R WC_RESOURCES

void head_pinball(float *restrict raw, const float *restrict y, const float *restrict w, const float *restrict tau,
                  double *restrict sums, int64_t u0, int64_t u1, int64_t n, int with_grad)
{
    for (int64_t u = u0; u < u1; ++u) {
        double acc[R];
        for (int k = 0; k < R; ++k) acc[k] = 0.0;
        for (int64_t s = 0; s < n; ++s) {
            const int64_t row = u * n + s;
            float *restrict r = raw + row * (K * C);
            const float *restrict yy = y + row * C;
            const float *restrict ww = w + row * WC_HORIZONS;
            float d[K][C], sg[K][C], g[K][C], wc[C], q[C], part[C];
            for (int c = 0; c < C; ++c) wc[c] = ww[c / R];  /* cell c = horizon * R + resource */
            for (int j = 1; j < K; ++j)  /* the gaps: softplus, and its derivative (sigmoid) */
                for (int c = 0; c < C; ++c) {
                    const float x = r[j * C + c];
                    const float e = expf(-fabsf(x));
                    d[j][c] = fmaxf(x, 0.0f) + log1pf(e);
                    const float inv = 1.0f / (1.0f + e);
                    sg[j][c] = x >= 0.0f ? inv : e * inv;
                }
            for (int c = 0; c < C; ++c) {  /* level 0 = the median's offset minus the gaps below it */
                float below = 0.0f;
                for (int j = 1; j <= MID; ++j) below += d[j][c];
                q[c] = r[c] - below;
                part[c] = 0.0f;
            }
            for (int j = 0; j < K; ++j) {  /* q = running sum of the increments; weighted pinball */
                if (j)
                    for (int c = 0; c < C; ++c) q[c] += d[j][c];
                const float t = tau[j];
                for (int c = 0; c < C; ++c) {
                    const float e = yy[c] - q[c];
                    const float gg = ((e < 0.0f ? 1.0f : 0.0f) - t) * wc[c];  /* w * d pinball / d q */
                    g[j][c] = gg;
                    part[c] += e * gg;  /* = -w * pinball */
                }
            }
            for (int c = 0; c < C; ++c) acc[c % R] -= part[c];
            if (!with_grad) continue;
            /* increment j moves every level >= j; a gap below the median also lowers increment 0 */
            for (int j = K - 2; j >= 0; --j)
                for (int c = 0; c < C; ++c) g[j][c] += g[j + 1][c];
            for (int c = 0; c < C; ++c) r[c] = g[0][c];
            for (int j = 1; j < K; ++j)
                for (int c = 0; c < C; ++c) r[j * C + c] = (j <= MID ? g[j][c] - g[0][c] : g[j][c]) * sg[j][c];
        }
        for (int k = 0; k < R; ++k) sums[u * R + k] = acc[k];
    }
}

/* The recalibration's grid search (models/calibration.py): for every grid value g and point p
 * (one origin of one user; points sorted by user), the pinball loss of
 *   mode 0: pred = max(base + grid[g] * delta, 0)        (a shift, spread or outward step)
 *   mode 1: pred = base < grid[g] ? 0 : max(base, 0)      (a floor)
 * against y, summed per user: sums[g, user[p] - user[0], m] (float64, added to). base, delta
 * [P, M] (contiguous, float32; delta unused in mode 1); y and tau [P, M] and [M] (each column's
 * target and level, so a column is one (horizon, resource, level)); user [P] (int64). */
void grid_pinball(const float *restrict base, const float *restrict delta, const float *restrict y,
                  const float *restrict tau, const float *restrict grid, int64_t n_grid, const int64_t *restrict user,
                  int64_t p0, int64_t p1, int64_t m, int mode, double *restrict sums, int64_t n_users)
{
    if (p0 >= p1) return;
    const int64_t u_lo = user[0];
    double acc[m * n_grid];
    int64_t current = user[p0];
    for (int64_t i = 0; i < m * n_grid; ++i) acc[i] = 0.0;
    for (int64_t p = p0; p <= p1; ++p) {
        if (p == p1 || user[p] != current) {  /* flush the finished user's sums */
            double *restrict out = sums + (current - u_lo) * m;
            for (int64_t g = 0; g < n_grid; ++g)
                for (int64_t j = 0; j < m; ++j) out[g * n_users * m + j] += acc[g * m + j];
            if (p == p1) break;
            current = user[p];
            for (int64_t i = 0; i < m * n_grid; ++i) acc[i] = 0.0;
        }
        const float *restrict b = base + p * m;
        const float *restrict d = delta + p * m;
        const float *restrict yy = y + p * m;
        for (int64_t g = 0; g < n_grid; ++g) {
            const float v = grid[g];
            double *restrict a = acc + g * m;
            if (mode == 0) {
                for (int64_t j = 0; j < m; ++j) {
                    const float pred = fmaxf(b[j] + v * d[j], 0.0f);
                    const float e = yy[j] - pred;
                    a[j] += e >= 0.0f ? tau[j] * e : (tau[j] - 1.0f) * e;
                }
            } else {
                for (int64_t j = 0; j < m; ++j) {
                    const float pred = b[j] < v ? 0.0f : fmaxf(b[j], 0.0f);
                    const float e = yy[j] - pred;
                    a[j] += e >= 0.0f ? tau[j] * e : (tau[j] - 1.0f) * e;
                }
            }
        }
    }
}

/* One LSTM step for `rows` cells (rows = users x chunks, contiguous), after the gate
 * pre-activations gates [rows, 4H] = x W_in + b + h W_rec (gate order input, forget, output,
 * cell): the activations in place (sigmoid, sigmoid, sigmoid, tanh), the new cell state c_out =
 * f c + i g, its tanh (tanh_out) and h_out = o tanh(c_out); c, c_out, tanh_out, h_out [rows, H]. */
void lstm_forward_step(float *restrict gates, const float *restrict c, float *restrict c_out,
                       float *restrict tanh_out, float *restrict h_out, int64_t rows, int64_t hidden)
{
    const int64_t h3 = 3 * hidden;
    for (int64_t r = 0; r < rows; ++r) {
        float *restrict a = gates + r * 4 * hidden;
        for (int64_t j = 0; j < h3; ++j) {
            const float x = a[j];
            const float e = expf(-fabsf(x));
            const float inv = 1.0f / (1.0f + e);
            a[j] = x >= 0.0f ? inv : e * inv;
        }
        for (int64_t j = h3; j < 4 * hidden; ++j) a[j] = tanhf(a[j]);
        const float *restrict cr = c + r * hidden;
        float *restrict co = c_out + r * hidden, *restrict to = tanh_out + r * hidden, *restrict ho = h_out + r * hidden;
        for (int64_t j = 0; j < hidden; ++j) {
            const float cn = a[hidden + j] * cr[j] + a[j] * a[h3 + j];
            const float t = tanhf(cn);
            co[j] = cn;
            to[j] = t;
            ho[j] = a[2 * hidden + j] * t;
        }
    }
}

/* The backward pass of lstm_forward_step for one step, from its saved activations acts [rows, 4H],
 * the cell state before it c_prev and tanh of the one after it tc [rows, H]: adds this step's
 * output gradient (grad_h: row r = user u, chunk k at u * grad_user_stride + k * H) into dh, then
 * dc += dh o (1 - tc^2); writes the pre-activation gradients dgates [rows, 4H] and leaves
 * dc = dc f (the gradient of the cell state before the step). dh [rows, H] is the caller's to
 * replace by dgates W_rec^T. */
void lstm_backward_step(const float *restrict acts, const float *restrict c_prev, const float *restrict tc,
                        const float *restrict grad_h, int64_t grad_user_stride, int64_t chunks,
                        float *restrict dh, float *restrict dc, float *restrict dgates, int64_t rows, int64_t hidden)
{
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict a = acts + r * 4 * hidden;
        const float *restrict gh = grad_h + (r / chunks) * grad_user_stride + (r % chunks) * hidden;
        const float *restrict cp = c_prev + r * hidden, *restrict t = tc + r * hidden;
        float *restrict dhr = dh + r * hidden, *restrict dcr = dc + r * hidden, *restrict d = dgates + r * 4 * hidden;
        for (int64_t j = 0; j < hidden; ++j) {
            const float i = a[j], f = a[hidden + j], o = a[2 * hidden + j], g = a[3 * hidden + j], tj = t[j];
            const float dhv = dhr[j] + gh[j];
            const float dcv = dcr[j] + dhv * o * (1.0f - tj * tj);
            d[j] = dcv * g * (i - i * i);
            d[hidden + j] = dcv * cp[j] * (f - f * f);
            d[2 * hidden + j] = dhv * tj * (o - o * o);
            d[3 * hidden + j] = dcv * i * (1.0f - g * g);
            dhr[j] = dhv;
            dcr[j] = dcv * f;
        }
    }
}
