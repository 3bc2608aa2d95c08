// gRPC metadata keys of the ramba.v1 API (ramba.proto's file comment says what each carries).
#ifndef RAMBA_V1_METADATA_H_
#define RAMBA_V1_METADATA_H_

namespace ramba::v1 {

// Trailing metadata of a FAILED_PRECONDITION from `expected_position`: the session's position.
inline constexpr char kSessionPositionMetadata[] = "ramba-session-position";
// Request metadata a router in front of several replicas hashes: the session's route key.
inline constexpr char kRouteKeyMetadata[] = "ramba-route-key";

}  // namespace ramba::v1

#endif  // RAMBA_V1_METADATA_H_
