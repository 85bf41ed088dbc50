//! GGUF header reading: tensor names and types, checked before MLX's loader runs.
//!
//! MLX's loader errors on some tensor types without naming them and silently stops at others
//! (returning part of the file), so the types are validated here first.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// ggml types MLX's loader turns into arrays the engine runs.
const SUPPORTED: &[u32] = &[0, 1, 2, 3, 8]; // F32, F16, Q4_0, Q4_1, Q8_0

pub fn type_name(t: u32) -> String {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        other => return format!("type {other}"),
    };
    name.to_string()
}

struct Reader<R: Read + Seek>(R);

impl<R: Read + Seek> Reader<R> {
    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.0.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.0.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > 1 << 24 {
            bail!("implausible string length {n}");
        }
        let mut b = vec![0u8; n as usize];
        self.0.read_exact(&mut b)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
    fn skip(&mut self, n: u64) -> Result<()> {
        self.0.seek(SeekFrom::Current(n as i64))?;
        Ok(())
    }
    /// Skip one metadata value of GGUF value type `t`.
    fn skip_value(&mut self, t: u32) -> Result<()> {
        match t {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => self.string().map(drop),
            9 => {
                let inner = self.u32()?;
                let n = self.u64()?;
                for _ in 0..n {
                    self.skip_value(inner)?;
                }
                Ok(())
            }
            other => bail!("unknown metadata value type {other}"),
        }
    }
}

/// (name, ggml type) of every tensor in the file.
pub fn tensor_types(path: &Path) -> Result<Vec<(String, u32)>> {
    Ok(read_header(path)?.1)
}

/// `general.architecture` of the file (llama.cpp's name: "llama", "qwen2", ...).
pub fn architecture(path: &Path) -> Result<Option<String>> {
    Ok(read_header(path)?.0)
}

/// `general.architecture` and (name, ggml type) of every tensor.
fn read_header(path: &Path) -> Result<(Option<String>, Vec<(String, u32)>)> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut r = Reader(BufReader::new(file));
    let read = |r: &mut Reader<BufReader<File>>| -> Result<(Option<String>, Vec<(String, u32)>)> {
        let mut magic = [0u8; 4];
        r.0.read_exact(&mut magic)?;
        if &magic != b"GGUF" {
            bail!("not a GGUF file (bad magic)");
        }
        let version = r.u32()?;
        if version < 2 {
            bail!("GGUF version {version} is not supported (2 or 3 are)");
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        let mut arch = None;
        for _ in 0..n_kv {
            let key = r.string()?;
            let t = r.u32()?;
            if key == "general.architecture" && t == 8 {
                arch = Some(r.string()?);
            } else {
                r.skip_value(t)?;
            }
        }
        let mut out = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            r.skip(8 * n_dims as u64)?;
            let t = r.u32()?;
            r.u64()?; // offset
            out.push((name, t));
        }
        Ok((arch, out))
    };
    read(&mut r).with_context(|| format!("reading the GGUF header of {} (truncated or corrupt?)", path.display()))
}

/// Fail with the first tensor whose type the engine does not run.
pub fn check_supported(path: &Path) -> Result<()> {
    for (name, t) in tensor_types(path)? {
        if !SUPPORTED.contains(&t) {
            bail!(
                "GGUF {}: tensor {name:?} has type {}, which is not supported (supported: {})",
                path.display(),
                type_name(t),
                crate::weights::GGUF_SUPPORTED
            );
        }
    }
    Ok(())
}
