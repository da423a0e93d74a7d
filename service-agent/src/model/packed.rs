//! An object kept as compressed JSON text between the times it is read.
//!
//! A source holds every Service and slice of the cluster, but the planner
//! reads one only when it changed (or at a full recompile). As k8s-openapi
//! structs, 10,000 Services with 10 endpoints each take about 90 MiB
//! (every optional field has its room, every string its allocation); as
//! JSON, without the fields `trim` removed, a fifth of that; compressed
//! with LZ4 against a dictionary of what Services and slices have in
//! common (their keys, the usual values), a sixth of the JSON again: alone,
//! an object of a few hundred bytes has too little to compress. Unpacking
//! one costs microseconds.
use std::{fmt, marker::PhantomData};

use serde::{Serialize, de::DeserializeOwned};

use super::Sourced;

/// Text every object of any kind is compressed against: typical trimmed
/// Services and EndpointSlices, as serde_json writes them. Changing it
/// changes nothing kept across runs: objects are packed and unpacked by
/// the same process.
const DICTIONARY: &[u8] = include_bytes!("packed_dictionary.json");

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
            packed: lz4_flex::block::compress_prepend_size_with_dict(&json, DICTIONARY)
                .into_boxed_slice(),
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
        lz4_flex::block::decompress_size_prepended_with_dict(&self.packed, DICTIONARY)
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

    /// The dictionary is what makes a lone object small: a slice of ten
    /// endpoints, as a controller writes it, packs to well under a fifth of
    /// its JSON (about 1.7 KB), where LZ4 alone leaves a third.
    #[test]
    fn a_typical_slice_packs_small() {
        let endpoints = (0..10)
            .map(|k| {
                serde_json::json!({
                    "addresses": [format!("10.128.3.{k}")],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": format!("worker-{}", k % 3),
                    "zone": format!("eu-west-{}", k % 3),
                })
            })
            .collect::<Vec<_>>();
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "addressType": "IPv4",
            "endpoints": endpoints,
            "metadata": {
                "name": "checkout-7xk2p",
                "namespace": "shop",
                "resourceVersion": "48213",
                "creationTimestamp": "2026-10-02T08:15:00Z",
                "labels": {"kubernetes.io/service-name": "checkout"},
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-10-02T08:15:00Z"},
            },
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))
        .unwrap();
        let json = serde_json::to_vec(&slice).unwrap().len();
        let p = Packed::pack(&Sourced::new("", slice.clone()));
        assert!(p.size() * 5 < json, "{} bytes packed of {json}", p.size());
        assert_eq!(p.unpack().object, slice);
    }
}
