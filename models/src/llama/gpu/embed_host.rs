//! The input embedding table in pinned host memory (`GpuLlama::set_embeddings_in_host_memory`).
//!
//! An untied embedding table is read once per step, by the gather of the batch's N rows: with
//! the table in page-locked host memory the gather kernel reads those N * C bf16 over PCIe
//! (unified addressing: the host pointer is valid in kernels) and the V * C table leaves the
//! GPU: 1 GiB for Llama-3.1-8B (128256 x 4096), against ~33 MB read per 4096-token step. A tied
//! table is also the LM head, which the head GEMMs read whole every step: it stays on the GPU.

use super::{Ctx, GpuLlama, GpuResult};
use ftrt_runtime::offload::PinnedHostBuffer;
use ftrt_runtime::DevPtr;
use half::bf16;

impl GpuLlama<'_> {
    /// Moves the (untied) input embedding table to pinned host memory and the other weights
    /// into a device buffer of their own, freeing the table's V * C bf16 on the GPU. The
    /// embedding is the first range of the weight layout, so `weights` stays the base of every
    /// other range (it then points before the new buffer, at where the table would start).
    pub fn set_embeddings_in_host_memory(&mut self) -> GpuResult<()> {
        if self.embed_host.is_some() {
            return Ok(());
        }
        if self.config.tie_word_embeddings {
            return Err(
                "tied embeddings: the table is also the LM head, which stays on the GPU".into(),
            );
        }
        let gpu = self.gpu;
        let e = self.layout.embed.clone();
        if e.start != 0 {
            return Err("the embedding is not the first range of the weight layout".into());
        }
        let total = super::plan::layout_len(&self.layout);
        let host = PinnedHostBuffer::new(gpu, e.len() * 2).ctx("allocating pinned memory")?;
        // SAFETY: the buffer holds e.len() bf16 (page-aligned), owned by `host`.
        let table = unsafe { std::slice::from_raw_parts_mut(host.ptr_at(0) as *mut bf16, e.len()) };
        gpu.download(self.weights, table)
            .ctx("copying the embedding table to host memory")?;
        let rest_bytes = (total - e.len()) * 2;
        let rest = gpu
            .alloc(rest_bytes.max(256))
            .ctx(&format!("allocating {rest_bytes} bytes of GPU memory"))?;
        gpu.copy_d2d(rest.ptr(), self.weights.offset(e.len()).cast(), rest_bytes)
            .ctx("moving the weights")?;
        gpu.synchronize().ctx("moving the weights")?;
        let old = self.weights.addr;
        self.weights = DevPtr::new(rest.ptr::<u8>().addr - (e.len() * 2) as u64);
        let held = &mut self._held;
        if let Some(i) = held.bufs.iter().position(|b| b.ptr::<u8>().addr == old) {
            held.bytes -= held.bufs.remove(i).bytes();
        }
        held.bytes += rest.bytes();
        held.bufs.push(rest);
        self.embed_host = Some(host);
        Ok(())
    }

    /// Whether the embedding table lives in host memory.
    pub fn embeddings_in_host_memory(&self) -> bool {
        self.embed_host.is_some()
    }

    /// The (V, C) bf16 embedding table the gather reads: in host memory or on the GPU.
    pub(super) fn embed_table(&self) -> DevPtr<bf16> {
        match &self.embed_host {
            Some(h) => DevPtr::new(h.ptr_at(0) as u64),
            None => self.w(&self.layout.embed),
        }
    }
}
