/* Issuing a whole GPU transfer with one call from Python.
 *
 * A 256-token chunk moves over PCIe in ~0.8 ms. Issued op by op from Python, a transfer's
 * CUDA calls (events, a kernel launch, copies) and the address arithmetic around them cost
 * tens of microseconds before the first byte moved, measured on the GPU machines. Here the same
 * operations are enqueued in C; the Python side (kvdepot/transfer/native_issue.py) builds
 * each engine's plan once and makes one call per transfer.
 *
 * No CUDA headers: the entry points come in as function pointers from the libraries the
 * process already loaded (torch's libcudart, libcuda), so this builds with any C compiler.
 * Functions return 0 or the failing call's error code, with the call named in *failed. Not
 * thread-safe per direction: callers hold one lock per direction.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

enum { CALL_RECORD = 1, CALL_WAIT = 2, CALL_MEMCPY = 3, CALL_LAUNCH = 4, CALL_QUERY = 5,
       CALL_SYNC = 6, CALL_PLAN = 7, CALL_MEMCPY_BATCH = 8, CALL_MALLOC = 9 };

enum { MAX_SCALARS = 8, MAX_EXTRA = 4, N_POINTERS = 5, MEMCPY_DEFAULT = 4,
       ERR_NOT_READY = 600, ERR_MEMORY_ALLOCATION = 2 };

typedef int (*record_fn)(void *event, void *stream);
typedef int (*wait_fn)(void *stream, void *event, unsigned flags);
typedef int (*query_fn)(void *event);
typedef int (*sync_fn)(void *event);
typedef int (*last_error_fn)(void);
typedef int (*memcpy_fn)(void *dst, const void *src, size_t n, int kind, void *stream);
typedef int (*launch_fn)(void *function, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                         unsigned by, unsigned bz, unsigned shared, void *stream, void **params,
                         void **extra);

/* cudaMemcpyBatchAsync: CUDA 12.8-12.9 take a failIdx argument that CUDA 13 dropped. */
typedef int (*batch12_fn)(void **dsts, void **srcs, size_t *sizes, size_t count, void *attrs,
                          size_t *attr_idxs, size_t num_attrs, size_t *fail_idx, void *stream);
typedef int (*batch13_fn)(void **dsts, void **srcs, size_t *sizes, size_t count, void *attrs,
                          size_t *attr_idxs, size_t num_attrs, void *stream);

typedef struct {
    record_fn record;     /* cudaEventRecord */
    wait_fn wait;         /* cudaStreamWaitEvent */
    query_fn query;       /* cudaEventQuery */
    sync_fn sync;         /* cudaEventSynchronize */
    memcpy_fn memcpy;     /* cudaMemcpyAsync */
    launch_fn launch;     /* cuLaunchKernel */
    last_error_fn clear_error; /* cudaGetLastError (after an expected "not ready") */
} kvd_api;

#define CALL(kind, expr)          \
    do {                          \
        int code_ = (expr);       \
        if (code_) {              \
            *failed = (kind);     \
            return code_;         \
        }                         \
    } while (0)

/* -- the DMA engine: the copy engines move runs of adjacent pieces ------------------------ */

typedef struct {
    const int64_t *plane_ptr;    /* [n_planes] device address of each plane (view) */
    const int64_t *plane_stride; /* [n_planes] bytes between a plane's blocks */
    int64_t piece;               /* bytes per (plane, block) piece */
    int64_t slot_plane_stride;   /* bytes between a plane's pieces in a slot */
    int64_t slot_block_stride;   /* bytes between a block's pieces in a slot */
    int64_t arena;               /* address of the arena (registered host memory) */
    void *batch;                 /* cudaMemcpyBatchAsync, or NULL: one cudaMemcpyAsync a run */
    void *batch_attrs;           /* its cudaMemcpyAttributes (one set for every copy) */
    int32_t batch_has_fail_idx;
    int32_t n_planes;
    int32_t bpc;                 /* blocks per chunk */
    int32_t pad;
} kvd_dma_plan;

/* Copies chunk by chunk, plane by plane, block by block, pieces adjacent on both sides merged
 * into one run; all runs in one batch call where the runtime has it. The copy stream first
 * waits for the producer's work (fence). */
int kvd_dma(const kvd_api *api, const kvd_dma_plan *plan, const int64_t *slots,
            const int64_t *block_ids, int32_t n_chunks, int32_t to_slot, void *producer,
            void *stream, void *fence, void *start, void *done, int32_t *failed)
{
    CALL(CALL_RECORD, api->record(fence, producer));
    CALL(CALL_WAIT, api->wait(stream, fence, 0));
    if (start)
        CALL(CALL_RECORD, api->record(start, stream));
    size_t max_runs = (size_t)n_chunks * plan->n_planes * plan->bpc;
    void **dsts = malloc(max_runs * sizeof(void *));
    void **srcs = malloc(max_runs * sizeof(void *));
    size_t *sizes = malloc(max_runs * sizeof(size_t));
    int code = 0;
    if (!dsts || !srcs || !sizes) {
        *failed = CALL_MALLOC;
        code = ERR_MEMORY_ALLOCATION;
        goto out;
    }
    size_t n = 0;
    int64_t run_cache = 0, run_slot = 0;
    for (int32_t c = 0; c < n_chunks; c++) {
        const int64_t *ids = block_ids + (int64_t)c * plan->bpc;
        int64_t slot = plan->arena + slots[c];
        for (int32_t p = 0; p < plan->n_planes; p++) {
            for (int32_t j = 0; j < plan->bpc; j++) {
                int64_t cache = plan->plane_ptr[p] + ids[j] * plan->plane_stride[p];
                int64_t dst = slot + p * plan->slot_plane_stride + j * plan->slot_block_stride;
                if (n && cache == run_cache + (int64_t)sizes[n - 1]
                    && dst == run_slot + (int64_t)sizes[n - 1]) {
                    sizes[n - 1] += (size_t)plan->piece;
                    continue;
                }
                dsts[n] = (void *)(to_slot ? dst : cache);
                srcs[n] = (void *)(to_slot ? cache : dst);
                sizes[n] = (size_t)plan->piece;
                run_cache = cache;
                run_slot = dst;
                n++;
            }
        }
    }
    if (plan->batch && n > 1) {
        size_t attr_idx = 0, fail_idx = 0;
        code = plan->batch_has_fail_idx
            ? ((batch12_fn)plan->batch)(dsts, srcs, sizes, n, plan->batch_attrs, &attr_idx, 1,
                                        &fail_idx, stream)
            : ((batch13_fn)plan->batch)(dsts, srcs, sizes, n, plan->batch_attrs, &attr_idx, 1,
                                        stream);
        if (code) {
            *failed = CALL_MEMCPY_BATCH;
            goto out;
        }
    } else {
        for (size_t i = 0; i < n; i++) {
            code = api->memcpy(dsts[i], srcs[i], sizes[i], MEMCPY_DEFAULT, stream);
            if (code) {
                *failed = CALL_MEMCPY;
                goto out;
            }
        }
    }
    code = api->record(done, stream);
    if (code)
        *failed = CALL_RECORD;
out:
    free(dsts);
    free(srcs);
    free(sizes);
    return code;
}

/* -- the staged engine: a fused gather/scatter kernel + DMA of whole slots ---------------- */

typedef struct {
    void *function;                   /* CUfunction of the fused copy kernel */
    uint32_t block_threads;
    uint32_t shared_bytes;
    int32_t scalar_size[MAX_SCALARS]; /* 4 or 8: widths this compilation takes */
    int32_t n_extra;                  /* trailing pointer-sized scratch arguments (zeros) */
} kvd_kernel;

typedef struct {
    int64_t *host;        /* pinned ring of launch tables, int64 entries */
    int64_t device;       /* the ring's device address */
    void **events;        /* one per slot: its last reader */
    uint8_t *in_flight;
    int32_t slots;
    int32_t entries;      /* per slot */
    int32_t next;
    int32_t pad;
} kvd_ring;

typedef struct {
    kvd_kernel kernel[2];          /* [to_slot] */
    kvd_ring ring[2];              /* [to_slot]: the directions run on different threads */
    int64_t cache;                 /* kernel's cache base pointer (device address) */
    int64_t plane_off;             /* device addresses of the kernel's plane tables */
    int64_t plane_stride;
    int32_t n_planes;
    int32_t bpc;
    int64_t unit;                  /* bytes per kernel copy unit */
    int64_t piece_units;
    int64_t tiles;                 /* tiles per piece */
    int64_t slot_bytes;
    int64_t arena;                 /* host address of the arena */
    int64_t staging[2][2];         /* [to_slot][buffer] device addresses */
    void *filled[2][2];            /* [to_slot][buffer]: gathered (store) / copied in (load) */
    void *freed[2][2];             /* [to_slot][buffer]: its contents consumed */
    void *kernel_stream[2];
    void *copy_stream[2];
    int32_t staging_chunks;        /* chunks per staging buffer */
    int32_t max_programs;
    uint8_t used[2][2];
    int32_t next[2];
} kvd_staged_plan;

static int take_table(const kvd_api *api, kvd_ring *ring, int32_t *slot, int32_t *failed)
{
    int32_t i = ring->next;
    ring->next = (i + 1) % ring->slots;
    if (ring->in_flight[i]) {
        int code = api->query(ring->events[i]);
        if (code == ERR_NOT_READY) {
            api->clear_error();
            CALL(CALL_SYNC, api->sync(ring->events[i]));
        } else if (code) {
            *failed = CALL_QUERY;
            return code;
        }
        ring->in_flight[i] = 0;
    }
    *slot = i;
    return 0;
}

static int launch(const kvd_api *api, const kvd_staged_plan *plan, int32_t to_slot,
                  int64_t staging, int64_t table_off, int32_t n_chunks, void *stream,
                  int32_t *failed)
{
    const kvd_kernel *k = &plan->kernel[to_slot];
    uint64_t pointers[N_POINTERS] = {
        (uint64_t)plan->cache, (uint64_t)staging, (uint64_t)plan->plane_off,
        (uint64_t)plan->plane_stride, (uint64_t)plan->ring[to_slot].device,
    };
    /* The kernel's integer arguments, in its signature's order. */
    int64_t values[MAX_SCALARS] = {
        table_off, n_chunks, plan->n_planes, plan->bpc, plan->bpc * plan->piece_units,
        plan->piece_units, plan->piece_units, plan->tiles,
    };
    union { uint32_t u32; uint64_t u64; } scalars[MAX_SCALARS];
    uint64_t extra[MAX_EXTRA] = {0};
    void *params[N_POINTERS + MAX_SCALARS + MAX_EXTRA];
    int n = 0;
    for (int i = 0; i < N_POINTERS; i++)
        params[n++] = &pointers[i];
    for (int i = 0; i < MAX_SCALARS; i++) {
        if (k->scalar_size[i] == 4)
            scalars[i].u32 = (uint32_t)values[i];
        else
            scalars[i].u64 = (uint64_t)values[i];
        params[n++] = &scalars[i];
    }
    for (int i = 0; i < k->n_extra; i++)
        params[n++] = &extra[i];
    int64_t work = (int64_t)n_chunks * plan->n_planes * plan->bpc * plan->tiles;
    int64_t grid = work < plan->max_programs ? work : plan->max_programs;
    CALL(CALL_LAUNCH, api->launch(k->function, (unsigned)(grid > 0 ? grid : 1), 1, 1,
                                  k->block_threads, 1, 1, k->shared_bytes, stream, params,
                                  NULL));
    return 0;
}

static int copy_slots(const kvd_api *api, const kvd_staged_plan *plan, int32_t to_slot,
                      int64_t staging, const int64_t *slots, int32_t n_chunks, void *stream,
                      int32_t *failed)
{
    for (int32_t c = 0; c < n_chunks; c++) {
        int64_t host = plan->arena + slots[c];
        int64_t dev = staging + c * plan->slot_bytes;
        void *d = (void *)(to_slot ? host : dev);
        void *s = (void *)(to_slot ? dev : host);
        CALL(CALL_MEMCPY, api->memcpy(d, s, (size_t)plan->slot_bytes, MEMCPY_DEFAULT, stream));
    }
    return 0;
}

/* Stores: per group of chunks that fits a staging buffer, gather on the kernel stream, then
 * DMA each slot out on the copy stream. Loads mirror it: DMA in, then scatter. Two staging
 * buffers per direction alternate, so one group's gather overlaps the previous group's DMA; a
 * buffer is reused only after its last reader (freed). Only work touching the cache waits for
 * the producer (fence): a load's DMA into staging starts at once. (Cutting a lone transfer
 * into parts, DMA of each after its own gather, measured no faster on the H200: each extra
 * copy cost ~10 us of link time, about what it saved of the gather.) */
int kvd_staged(const kvd_api *api, kvd_staged_plan *plan, const int64_t *slots,
               const int64_t *block_ids, int32_t n_chunks, int32_t to_slot, void *producer,
               void *fence, void *start, void *done, int32_t *failed)
{
    to_slot = to_slot ? 1 : 0;
    void *kstream = plan->kernel_stream[to_slot];
    void *cstream = plan->copy_stream[to_slot];
    kvd_ring *ring = &plan->ring[to_slot];
    if ((int64_t)plan->staging_chunks * (1 + plan->bpc) > ring->entries) {
        *failed = CALL_PLAN;
        return -1;
    }
    CALL(CALL_RECORD, api->record(fence, producer));
    CALL(CALL_WAIT, api->wait(kstream, fence, 0));
    if (start)
        CALL(CALL_RECORD, api->record(start, to_slot ? kstream : cstream));
    for (int32_t g = 0; g < n_chunks; g += plan->staging_chunks) {
        int32_t n = n_chunks - g < plan->staging_chunks ? n_chunks - g : plan->staging_chunks;
        int32_t b = plan->next[to_slot];
        plan->next[to_slot] = 1 - b;
        int64_t staging = plan->staging[to_slot][b];
        int reuse = plan->used[to_slot][b];
        plan->used[to_slot][b] = 1;
        int32_t slot;
        int code = take_table(api, ring, &slot, failed);
        if (code)
            return code;
        int64_t table_off = (int64_t)slot * ring->entries;
        int64_t *table = ring->host + table_off;
        for (int32_t c = 0; c < n; c++) {
            table[c] = (c * plan->slot_bytes) / plan->unit;
            for (int32_t j = 0; j < plan->bpc; j++)
                table[n + c * plan->bpc + j] = block_ids[(int64_t)(g + c) * plan->bpc + j];
        }
        const int64_t *group_slots = slots + g;
        void *filled = plan->filled[to_slot][b];
        void *freed = plan->freed[to_slot][b];
        if (to_slot) {
            if (reuse)  /* its last DMA out has read it */
                CALL(CALL_WAIT, api->wait(kstream, freed, 0));
            code = launch(api, plan, 1, staging, table_off, n, kstream, failed);
            if (code)
                return code;
            CALL(CALL_RECORD, api->record(filled, kstream));
            CALL(CALL_WAIT, api->wait(cstream, filled, 0));
            code = copy_slots(api, plan, 1, staging, group_slots, n, cstream, failed);
            if (code)
                return code;
            CALL(CALL_RECORD, api->record(freed, cstream));
        } else {
            if (reuse)  /* its last scatter has read it */
                CALL(CALL_WAIT, api->wait(cstream, freed, 0));
            code = copy_slots(api, plan, 0, staging, group_slots, n, cstream, failed);
            if (code)
                return code;
            CALL(CALL_RECORD, api->record(filled, cstream));
            CALL(CALL_WAIT, api->wait(kstream, filled, 0));
            code = launch(api, plan, 0, staging, table_off, n, kstream, failed);
            if (code)
                return code;
            CALL(CALL_RECORD, api->record(freed, kstream));
        }
        CALL(CALL_RECORD, api->record(ring->events[slot], kstream));
        ring->in_flight[slot] = 1;
    }
    /* A store ends with its last DMA out; a load with its last scatter, which follows every
     * DMA in and every earlier scatter on the kernel stream. */
    CALL(CALL_RECORD, api->record(done, to_slot ? cstream : kstream));
    return 0;
}

size_t kvd_sizeof_api(void) { return sizeof(kvd_api); }
size_t kvd_sizeof_dma_plan(void) { return sizeof(kvd_dma_plan); }
size_t kvd_sizeof_staged_plan(void) { return sizeof(kvd_staged_plan); }
