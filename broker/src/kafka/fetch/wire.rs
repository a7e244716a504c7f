//! One plaintext connection to a Kafka broker: a request, then its
//! response (one at a time, which is all a fetch loop needs).

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, FetchRequest, FetchResponse, InitProducerIdRequest, InitProducerIdResponse,
    ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse, ProduceRequest,
    ProduceResponse, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::fetch_codec::{self, FetchSpec, PartitionAnswer};

/// Largest response accepted: a fetch answers at most `FETCH_MAX_BYTES`
/// (plus one oversized batch, KIP-74); anything past this is a protocol
/// error rather than memory we would hold.
const MAX_FRAME: usize = 128 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes asked of each read: a whole small response, or a large one in few
/// system calls.
const READ_CHUNK: usize = 64 << 10;
/// Past this the read buffer is let go once a response has been read, so an
/// idle reader does not keep the memory of its largest response.
const KEEP_BUFFER: usize = 4 << 20;

/// A request this client sends, and its response (`kafka_protocol`'s own
/// `Request` pairing needs its server-side half compiled in too).
pub trait Call: Encodable + HeaderVersion {
    const KEY: ApiKey;
    type Response: Decodable + HeaderVersion;
}

impl Call for ListOffsetsRequest {
    const KEY: ApiKey = ApiKey::ListOffsets;
    type Response = ListOffsetsResponse;
}

impl Call for MetadataRequest {
    const KEY: ApiKey = ApiKey::Metadata;
    type Response = MetadataResponse;
}

impl Call for InitProducerIdRequest {
    const KEY: ApiKey = ApiKey::InitProducerId;
    type Response = InitProducerIdResponse;
}

impl Call for ProduceRequest {
    const KEY: ApiKey = ApiKey::Produce;
    type Response = ProduceResponse;
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connecting to Kafka at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("Kafka connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("Kafka protocol: {0}")]
    Protocol(String),
    #[error("Kafka did not answer within {0:?}")]
    Timeout(Duration),
}

pub struct KafkaConn {
    stream: TcpStream,
    /// Responses are read into it and split off: once a fetch's records
    /// have been handed over, its memory is reused (`reserve` reclaims an
    /// allocation no `Bytes` holds any more) and never zeroed. A fresh
    /// zeroed buffer per response was 5-7 % of the read path's profile
    /// samples at 16,000 msg/s (docs/benchmarks.md).
    inbuf: BytesMut,
    client_id: StrBytes,
    next_id: i32,
    out: BytesMut,
}

impl KafkaConn {
    pub async fn connect(addr: &str, client_id: &str) -> Result<KafkaConn, WireError> {
        let connect_err = |reason: String| WireError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err("timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        stream.set_nodelay(true)?;
        Ok(KafkaConn {
            stream,
            inbuf: BytesMut::new(),
            client_id: StrBytes::from_string(client_id.to_string()),
            next_id: 0,
            out: BytesMut::new(),
        })
    }

    /// Sends `req` at `version` and waits up to `timeout` for its response.
    pub async fn request<R: Call>(
        &mut self,
        req: &R,
        version: i16,
        timeout: Duration,
    ) -> Result<R::Response, WireError> {
        within(timeout, self.round_trip(req, version)).await
    }

    async fn round_trip<R: Call>(
        &mut self,
        req: &R,
        version: i16,
    ) -> Result<R::Response, WireError> {
        let id = self
            .send(R::KEY, version, R::header_version(version), |out| {
                req.encode(out, version)
                    .map_err(|e| WireError::Protocol(e.to_string()))
            })
            .await?;
        let mut body = self
            .response(id, R::Response::header_version(version))
            .await?;
        R::Response::decode(&mut body, version).map_err(|e| WireError::Protocol(e.to_string()))
    }

    /// One Fetch v12 round trip, written and read by `fetch_codec`: the
    /// top-level error code and each partition's answer.
    pub async fn fetch(
        &mut self,
        spec: &FetchSpec<'_>,
        timeout: Duration,
    ) -> Result<(i16, Vec<PartitionAnswer>), WireError> {
        let v = fetch_codec::VERSION;
        let exchange = async {
            let id = self
                .send(ApiKey::Fetch, v, FetchRequest::header_version(v), |out| {
                    fetch_codec::encode_request(spec, out);
                    Ok(())
                })
                .await?;
            let body = self.response(id, FetchResponse::header_version(v)).await?;
            fetch_codec::decode_response(body).map_err(|e| WireError::Protocol(e.to_string()))
        };
        within(timeout, exchange).await
    }

    /// Writes one request (header, then what `body` puts); its correlation id.
    async fn send(
        &mut self,
        key: ApiKey,
        version: i16,
        header_version: i16,
        body: impl FnOnce(&mut BytesMut) -> Result<(), WireError>,
    ) -> Result<i32, WireError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(id)
            .with_client_id(Some(self.client_id.clone()));
        self.out.clear();
        self.out.put_i32(0);
        header
            .encode(&mut self.out, header_version)
            .map_err(|e| WireError::Protocol(e.to_string()))?;
        body(&mut self.out)?;
        let len = i32::try_from(self.out.len() - 4)
            .map_err(|_| WireError::Protocol("request too large".into()))?;
        self.out[..4].copy_from_slice(&len.to_be_bytes());
        self.stream.write_all(&self.out).await?;
        Ok(id)
    }

    /// The body of the response to request `id`.
    async fn response(&mut self, id: i32, header_version: i16) -> Result<Bytes, WireError> {
        let mut frame = self.read_frame().await?;
        let rh = ResponseHeader::decode(&mut frame, header_version)
            .map_err(|e| WireError::Protocol(e.to_string()))?;
        if rh.correlation_id != id {
            return Err(WireError::Protocol(format!(
                "response to request {} where {id} was expected",
                rh.correlation_id
            )));
        }
        Ok(frame)
    }

    async fn read_frame(&mut self) -> Result<Bytes, WireError> {
        self.fill_to(4).await?;
        let len = (&self.inbuf[..4]).get_i32();
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| (4..=MAX_FRAME).contains(&l))
            .ok_or_else(|| WireError::Protocol(format!("response length {len}")))?;
        self.fill_to(4 + len).await?;
        let mut frame = self.inbuf.split_to(4 + len);
        frame.advance(4);
        if self.inbuf.capacity() > KEEP_BUFFER {
            // Requests go one at a time: nothing follows a response.
            self.inbuf = BytesMut::from(&self.inbuf[..]);
        }
        Ok(frame.freeze())
    }

    /// Reads until `inbuf` holds at least `n` bytes.
    async fn fill_to(&mut self, n: usize) -> Result<(), WireError> {
        while self.inbuf.len() < n {
            self.inbuf.reserve((n - self.inbuf.len()).max(READ_CHUNK));
            if self.stream.read_buf(&mut self.inbuf).await? == 0 {
                return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
        Ok(())
    }
}

/// `exchange`, or `WireError::Timeout` once `timeout` has passed.
async fn within<T>(
    timeout: Duration,
    exchange: impl std::future::Future<Output = Result<T, WireError>>,
) -> Result<T, WireError> {
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| WireError::Timeout(timeout))?
}
