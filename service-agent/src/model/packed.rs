//! An object kept as compressed JSON text between the times it is read.
//!
//! A source holds every Service and slice of the cluster, but the planner
//! reads one only when it changed (or at a full recompile). As k8s-openapi
//! structs, 10,000 Services with 10 endpoints each take about 90 MiB
//! (every optional field has its room, every string its allocation); as
//! JSON, without the fields `trim` removed, a fifth of that; compressed
//! (LZ4: an EndpointSlice repeats the same keys for every endpoint), a
//! third of the JSON again. Unpacking one costs microseconds.
use std::{fmt, marker::PhantomData};

use serde::{Serialize, de::DeserializeOwned};

use super::Sourced;

pub struct Packed<T> {
    pub origin: Box<str>,
    /// LZ4 block of the JSON text, its length first.
    packed: Box<[u8]>,
    _object: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned> Packed<T> {
    pub fn pack(object: &Sourced<T>) -> Self {
        // Serializing a k8s-openapi object cannot fail: every field is
        // plain data with string keys.
        let json =
            serde_json::to_vec(&object.object).expect("a Kubernetes object serializes to JSON");
        Self {
            origin: object.origin.as_str().into(),
            packed: lz4_flex::compress_prepend_size(&json).into_boxed_slice(),
            _object: PhantomData,
        }
    }

    pub fn unpack(&self) -> Sourced<T> {
        Sourced::new(
            self.origin.to_string(),
            serde_json::from_slice(&self.json()).expect("packed JSON reads back as its type"),
        )
    }

    /// Bytes held (for the memory the source reports).
    pub fn size(&self) -> usize {
        self.origin.len() + self.packed.len()
    }
}

impl<T> Packed<T> {
    fn json(&self) -> Vec<u8> {
        lz4_flex::decompress_size_prepended(&self.packed)
            .expect("a packed object decompresses: it was compressed here")
    }
}

impl<T> Clone for Packed<T> {
    fn clone(&self) -> Self {
        Self {
            origin: self.origin.clone(),
            packed: self.packed.clone(),
            _object: PhantomData,
        }
    }
}

/// Equal objects serialize equally (struct fields in declaration order,
/// maps sorted), and compress equally, so comparing the bytes compares the
/// objects.
impl<T> PartialEq for Packed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.origin == other.origin && self.packed == other.packed
    }
}

impl<T> fmt::Debug for Packed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Packed({}, {})",
            self.origin,
            String::from_utf8_lossy(&self.json())
        )
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

    use super::*;

    #[test]
    fn an_object_comes_back_as_it_went_in() {
        let slice = Sourced::new(
            "f.yaml#3",
            EndpointSlice {
                address_type: "IPv4".into(),
                endpoints: Some(vec![Endpoint {
                    addresses: vec!["10.1.0.5".into()],
                    node_name: Some("node-1".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            },
        );
        let p = Packed::pack(&slice);
        assert_eq!(p.unpack(), slice);
        assert_eq!(p, Packed::pack(&slice));
        let mut other = slice.clone();
        other.object.address_type = "IPv6".into();
        assert_ne!(p, Packed::pack(&other));
    }
}
