//! Zero-copy reading of DLPack capsules (`torch.utils.dlpack.to_dlpack(t)`, `t.__dlpack__()`,
//! numpy's `a.__dlpack__()`): a 2-D C-contiguous CPU float tensor as a typed slice, every field
//! of the capsule validated first.
//!
//! The capsule is only read, never consumed: it keeps its producer's tensor (and memory) alive
//! while the caller holds it, and its own destructor releases the tensor afterwards.

use crate::convert::Floats;
use bofrs_core::{Bf16, F16};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use std::ffi::{c_void, CStr};

/// The capsule name of an unconsumed legacy (unversioned) DLPack tensor.
const DLTENSOR: &CStr = c"dltensor";
/// `kDLCPU`.
const DEVICE_CPU: i32 = 1;
/// `kDLFloat` and `kDLBfloat` type codes.
const CODE_FLOAT: u8 = 2;
const CODE_BFLOAT: u8 = 4;

#[repr(C)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

/// The head of `DLManagedTensor` (only its tensor is read).
#[repr(C)]
struct DlManagedTensor {
    dl_tensor: DlTensor,
}

/// A 2-D float tensor read from a capsule: its values (row-major) and shape.
pub struct Matrix<'a> {
    pub values: Floats<'a>,
    pub rows: usize,
    pub cols: usize,
}

/// The 2-D float32 / bfloat16 / float16 CPU tensor of the DLPack capsule `obj`, borrowed for as
/// long as `obj` is; `name` is the argument's, for errors (TypeError for a wrong kind of
/// object or dtype, ValueError for a wrong device, rank, layout or alignment).
pub fn matrix<'a>(obj: &'a Bound<'_, PyAny>, name: &str) -> PyResult<Matrix<'a>> {
    // SAFETY: `obj` is a live object; IsValid only inspects it.
    if unsafe { ffi::PyCapsule_IsValid(obj.as_ptr(), DLTENSOR.as_ptr()) } != 1 {
        return Err(PyTypeError::new_err(format!(
            "{name} must be an unconsumed DLPack capsule named 'dltensor' (from \
             torch.utils.dlpack.to_dlpack), got {}",
            obj.get_type().name()?
        )));
    }
    // SAFETY: a valid capsule of that name; its pointer is the producer's DLManagedTensor,
    // alive while the capsule is (we hold a borrow of it for 'a).
    let tensor = unsafe {
        let managed = ffi::PyCapsule_GetPointer(obj.as_ptr(), DLTENSOR.as_ptr());
        if managed.is_null() {
            return Err(PyErr::fetch(obj.py()));
        }
        &(*(managed as *const DlManagedTensor)).dl_tensor
    };
    let bad = |what: String| PyValueError::new_err(format!("{name}: {what}"));
    if tensor.device.device_type != DEVICE_CPU {
        return Err(bad(format!(
            "must be on the CPU (DLPack device type {}, id {})",
            tensor.device.device_type, tensor.device.device_id
        )));
    }
    if tensor.ndim != 2 || tensor.shape.is_null() {
        return Err(bad(format!("must be 2-D, got {} dimensions", tensor.ndim)));
    }
    // SAFETY: `shape` holds `ndim` = 2 values, `strides` (when not null) too.
    let (shape, strides) = unsafe {
        let shape = std::slice::from_raw_parts(tensor.shape, 2);
        let strides =
            (!tensor.strides.is_null()).then(|| std::slice::from_raw_parts(tensor.strides, 2));
        (shape, strides)
    };
    let (rows, cols) = match (usize::try_from(shape[0]), usize::try_from(shape[1])) {
        (Ok(r), Ok(c)) => (r, c),
        _ => return Err(bad(format!("has a negative dimension: {shape:?}"))),
    };
    if let Some(s) = strides {
        // C-contiguous: unit column stride, rows `cols` apart (dimensions of size 1 take any).
        let ok = (cols <= 1 || s[1] == 1) && (rows <= 1 || s[0] == shape[1]);
        if !ok {
            return Err(bad(format!(
                "must be C-contiguous, got strides {s:?} for shape {shape:?} (call .contiguous())"
            )));
        }
    }
    let dt = &tensor.dtype;
    let element_size = match (dt.code, dt.bits, dt.lanes) {
        (CODE_FLOAT, 32, 1) => 4,
        (CODE_FLOAT, 16, 1) | (CODE_BFLOAT, 16, 1) => 2,
        _ => {
            return Err(PyTypeError::new_err(format!(
                "{name} must be float32, bfloat16 or float16, got DLPack dtype (code {}, bits {}, \
                 lanes {})",
                dt.code, dt.bits, dt.lanes
            )))
        }
    };
    let n = rows
        .checked_mul(cols)
        .filter(|n| {
            n.checked_mul(element_size)
                .is_some_and(|b| b <= isize::MAX as usize)
        })
        .ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
    let data = (tensor.data as *const u8).wrapping_add(tensor.byte_offset as usize);
    if n > 0 && (tensor.data.is_null() || data as usize % element_size != 0) {
        return Err(bad(
            "data pointer is null or not aligned to its element size".into(),
        ));
    }
    /// `n` values at `data` (dangling and unread when `n` is 0).
    ///
    /// # Safety
    /// `data` points to `n` initialized, aligned values of `T` that outlive `'a`.
    unsafe fn view<'a, T>(data: *const u8, n: usize) -> &'a [T] {
        if n == 0 {
            return &[];
        }
        unsafe { std::slice::from_raw_parts(data as *const T, n) }
    }
    // SAFETY: by the DLPack contract the producer's memory holds the `rows * cols` values of
    // this C-contiguous tensor (checked above: device, rank, layout, dtype, alignment), and it
    // lives as long as the capsule, which `obj` keeps for 'a.
    let values = unsafe {
        match (dt.code, dt.bits) {
            (CODE_FLOAT, 32) => Floats::F32(view::<f32>(data, n)),
            (CODE_FLOAT, _) => Floats::F16(view::<F16>(data, n)),
            _ => Floats::Bf16(view::<Bf16>(data, n)),
        }
    };
    Ok(Matrix { values, rows, cols })
}
