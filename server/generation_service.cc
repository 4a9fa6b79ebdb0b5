#include "server/generation_service.h"

#include <array>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "common/logging.h"
#include "common/strings.h"
#include "engine/chat/chat_template.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/unknown_field_set.h"
#include "morphserve/v1/generation.grpc.pb.h"
#include "spdlog/spdlog.h"

namespace morphserve::server {
namespace {

v1::FinishReason ToProto(FinishReason f) {
  switch (f) {
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    case FinishReason::kNone:
      break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::UnknownField;
using google::protobuf::UnknownFieldSet;

// Finishes a stream at once with an error (validation, draining).
class ErrorReactor : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  explicit ErrorReactor(grpc::Status status) { Finish(std::move(status)); }
  void OnDone() override { delete this; }
};

// The path of the first string field in `bytes` (a `type` message on the
// wire) that is not UTF-8, e.g. "chat.messages[1].content"; empty if none.
std::string FindInvalidUtf8(std::string_view bytes, const Descriptor& type,
                            const std::string& prefix) {
  UnknownFieldSet fields;
  if (!fields.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) return "";
  std::map<int, int> seen;  // field number -> occurrences so far
  for (int i = 0; i < fields.field_count(); ++i) {
    const UnknownField& f = fields.field(i);
    const FieldDescriptor* field = type.FindFieldByNumber(f.number());
    const int index = seen[f.number()]++;
    if (field == nullptr || f.type() != UnknownField::TYPE_LENGTH_DELIMITED) continue;
    std::string path = StrCat(prefix, field->name());
    if (field->is_repeated()) path = StrCat(path, "[", index, "]");
    if (field->type() == FieldDescriptor::TYPE_STRING && !IsValidUtf8(f.length_delimited())) {
      return path;
    }
    if (field->type() == FieldDescriptor::TYPE_MESSAGE) {
      std::string inner =
          FindInvalidUtf8(f.length_delimited(), *field->message_type(), StrCat(path, "."));
      if (!inner.empty()) return inner;
    }
  }
  return "";
}

// Parses a request; proto3 refuses a string field that is not UTF-8, and the
// error names that field.
grpc::Status ParseRequest(const grpc::ByteBuffer& buffer, google::protobuf::Message* message) {
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (buffer.Dump(&slices).ok()) {
    for (const grpc::Slice& slice : slices) {
      bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
    }
  }
  if (message->ParseFromString(bytes)) return grpc::Status::OK;
  const std::string field = FindInvalidUtf8(bytes, *message->GetDescriptor(), "");
  if (!field.empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, StrCat(field, ": not valid UTF-8"));
  }
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                      StrCat("the request is not a valid ", message->GetTypeName()));
}

grpc::Status Serialize(const google::protobuf::Message& message, grpc::ByteBuffer* out) {
  out->Clear();  // the previous write's bytes
  bool own = false;
  return grpc::SerializationTraits<google::protobuf::Message>::Serialize(message, out, &own);
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

std::string StatusCodeName(grpc::StatusCode code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

// The callback service itself (kept out of the header: gRPC's generated base
// keeps the synchronous overloads that these overrides hide by design, which
// -Woverloaded-virtual flags in every file that sees the class).
// The methods that carry text take raw bytes and parse them here, so that a
// string field that is not UTF-8 is an INVALID_ARGUMENT naming the field
// rather than gRPC's generic parse failure.
using ServiceBase =
    v1::Generation::WithRawCallbackMethod_Generate<v1::Generation::WithRawCallbackMethod_Tokenize<
        v1::Generation::WithRawCallbackMethod_Cancel<v1::Generation::CallbackService>>>;

class GenerationServiceImpl final : public ServiceBase {
 public:
  GenerationServiceImpl(const engine::Model& model, EngineLoop* engine, ServerDefaults defaults)
      : model_(model), engine_(engine), defaults_(std::move(defaults)) {}

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* GetLoad(grpc::CallbackServerContext* context,
                                    const v1::GetLoadRequest* request, v1::Load* response) override;

  void Register(const std::string& request_id, int64_t engine_id);
  void Forget(const std::string& request_id);
  // Finishes a unary call with `status`.
  static grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* context,
                                        const grpc::Status& status) {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(status);
    return reactor;
  }
  // Parses a raw unary request, runs `handle(request, &response)` and
  // answers with the response or the error.
  template <class Request, class Response, class Handler>
  grpc::ServerUnaryReactor* RawUnary(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* in, grpc::ByteBuffer* out,
                                     Handler handle) {
    grpc::Status status = Authorize(context);
    Request request;
    Response response;
    if (status.ok()) status = ParseRequest(*in, &request);
    if (status.ok()) status = handle(request, &response);
    if (status.ok()) status = Serialize(response, out);
    return Done(context, status);
  }
  // UNAUTHENTICATED unless API keys are off or the call carries one.
  grpc::Status Authorize(const grpc::CallbackServerContext* context) const;
  // A Generate call refused before it started: counted, logged, finished.
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Reject(const grpc::CallbackServerContext* context,
                                                     std::string_view request_id,
                                                     const grpc::Status& status) {
    ++rejected_[static_cast<size_t>(status.error_code()) % rejected_.size()];
    LogRequest(spdlog::level::info, request_id.empty() ? "-" : request_id, "Generate",
               {{"status", StatusCodeName(status.error_code())},
                {"error", status.error_message()},
                {"peer", context->peer()}});
    return new ErrorReactor(status);
  }

  const engine::Model& model_;
  EngineLoop* engine_;
  ServerDefaults defaults_;
  std::atomic<bool> draining_{false};
  std::atomic<int64_t> active_{0};
  std::atomic<int64_t> next_request_id_{1};
  std::mutex mu_;
  std::map<std::string, int64_t> ids_;  // client request id -> engine id
  std::array<std::atomic<int64_t>, std::tuple_size_v<Rejections>> rejected_{};
  bool log_prompts_ = false;
};

// Streams one request. State shared with the engine's notification lives in
// `Core`, which outlives the reactor: after OnDone, pokes do nothing.
class GenerateReactor : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  GenerateReactor(GenerationServiceImpl* service, int64_t engine_id, std::string request_id,
                  std::shared_ptr<TokenStream> stream, bool logprobs, std::string peer,
                  KvPolicyKind policy)
      : service_(service),
        engine_id_(engine_id),
        request_id_(std::move(request_id)),
        core_(std::make_shared<Core>()),
        logprobs_(logprobs),
        peer_(std::move(peer)),
        policy_(policy),
        started_(std::chrono::steady_clock::now()) {
    core_->reactor = this;
    core_->stream = std::move(stream);
    ++service_->active_;
    std::shared_ptr<Core> core = core_;
    core_->stream->SetNotify([core] { core->Poke(); });
    core_->Poke();
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(core_->mu);
      core_->in_flight = false;
      if (!ok) core_->cancelled = true;
    }
    if (!ok) service_->engine_->Cancel(engine_id_);
    core_->Poke();
  }

  void OnCancel() override {
    service_->engine_->Cancel(engine_id_);
    {
      std::lock_guard<std::mutex> lock(core_->mu);
      core_->cancelled = true;
    }
    core_->Poke();
  }

  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(core_->mu);
      core_->reactor = nullptr;
      LogAccess(*core_);
    }
    core_->stream->SetNotify(nullptr);
    service_->Forget(request_id_);
    --service_->active_;
    delete this;
  }

 private:
  struct Core {
    std::mutex mu;
    GenerateReactor* reactor = nullptr;  // null once the call is done
    std::shared_ptr<TokenStream> stream;
    bool in_flight = false;
    bool finished = false;
    bool cancelled = false;
    // How the call ended, for the access line.
    grpc::Status status;
    FinishReason finish = FinishReason::kNone;
    RequestUsage usage;
    std::string text;  // the whole reply, kept only when prompts are logged

    // Starts the next write (or the finish) when none is in flight.
    void Poke() {
      std::unique_lock<std::mutex> lock(mu);
      if (reactor == nullptr || finished || in_flight) return;
      GenerateReactor* r = reactor;
      if (cancelled) {
        finished = true;
        status = grpc::Status(grpc::StatusCode::CANCELLED, "the request was cancelled");
        lock.unlock();
        r->Finish(status);
        return;
      }
      // Reused from write to write; only touched while no write is in flight.
      v1::GenerateResponse& resp = r->response_;
      resp.Clear();
      resp.set_request_id(r->request_id_);
      std::optional<StreamEvent> last;
      bool any = false;
      while (auto e = stream->Pop(std::chrono::milliseconds(0))) {
        any = true;
        if (e->token >= 0) {
          resp.add_token_ids(e->token);
          if (r->logprobs_) {
            v1::TokenLogprobs* lp = resp.add_logprobs();
            lp->set_logprob(e->logprob);
            for (const engine::TokenLogprob& t : e->top) {
              v1::TokenLogprob* top = lp->add_top();
              top->set_id(t.id);
              top->set_logprob(t.logprob);
            }
          }
        }
        resp.mutable_text()->append(e->text);
        if (e->last()) {
          last = std::move(e);
          break;
        }
      }
      if (!any) return;
      if (r->service_->log_prompts_) text += resp.text();
      in_flight = true;
      if (!last.has_value()) {
        lock.unlock();
        r->Write(resp);
        return;
      }
      finished = true;
      status = ToGrpcStatus(last->error);
      finish = last->finish;
      usage = last->usage;
      lock.unlock();
      if (!status.ok()) {
        r->Finish(status);
        return;
      }
      resp.set_finish_reason(ToProto(last->finish));
      v1::Usage* u = resp.mutable_usage();
      u->set_prompt_tokens(static_cast<uint32_t>(last->usage.prompt_tokens));
      u->set_completion_tokens(static_cast<uint32_t>(last->usage.completion_tokens));
      u->set_kv_tokens_resident(static_cast<uint64_t>(last->usage.kv.tokens_resident));
      u->set_kv_tokens_full_equivalent(
          static_cast<uint64_t>(last->usage.kv.tokens_full_equivalent));
      u->set_kv_tokens_evicted(static_cast<uint64_t>(last->usage.kv.tokens_evicted));
      u->set_kv_bytes_resident(static_cast<uint64_t>(last->usage.kv.bytes_resident));
      u->set_kv_bytes_saved(static_cast<uint64_t>(last->usage.kv.bytes_saved));
      u->set_time_to_first_token_seconds(last->usage.time_to_first_token_seconds);
      u->set_queue_seconds(last->usage.queue_seconds);
      if (const grpc::Status s = Serialize(resp, &r->buffer_); !s.ok()) {
        r->Finish(s);
        return;
      }
      r->StartWriteAndFinish(&r->buffer_, grpc::WriteOptions(), grpc::Status::OK);
    }
  };

  // The request's one access line (holding core.mu).
  void LogAccess(const Core& core) const {
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
    const RequestUsage& u = core.usage;
    std::initializer_list<LogField> fields = {{"status", StatusCodeName(core.status.error_code())},
                                              {"finish", FinishReasonName(core.finish)},
                                              {"prompt_tokens", u.prompt_tokens},
                                              {"completion_tokens", u.completion_tokens},
                                              {"ttft_s", u.time_to_first_token_seconds},
                                              {"duration_s", seconds},
                                              {"kv_policy", KvPolicyName(policy_)},
                                              {"kv_tokens_resident", u.kv.tokens_resident},
                                              {"peer", peer_}};
    if (service_->log_prompts_) {
      LogRequest(spdlog::level::info, request_id_, "Generate reply", {{"text", core.text}});
    }
    LogRequest(spdlog::level::info, request_id_, "Generate", fields);
  }

  void Write(const v1::GenerateResponse& response) {
    if (const grpc::Status s = Serialize(response, &buffer_); !s.ok()) {
      Finish(s);
      return;
    }
    StartWrite(&buffer_);
  }

  GenerationServiceImpl* service_;
  int64_t engine_id_;
  std::string request_id_;
  std::shared_ptr<Core> core_;
  bool logprobs_;
  std::string peer_;
  KvPolicyKind policy_;
  std::chrono::steady_clock::time_point started_;
  v1::GenerateResponse response_;
  grpc::ByteBuffer buffer_;  // the write in flight
};

GenerationService::GenerationService(const engine::Model& model, EngineLoop* engine,
                                     ServerDefaults defaults)
    : impl_(std::make_unique<GenerationServiceImpl>(model, engine, std::move(defaults))) {}
GenerationService::~GenerationService() = default;
grpc::Service* GenerationService::grpc_service() { return impl_.get(); }
void GenerationService::StartDraining() { impl_->draining_ = true; }
int64_t GenerationService::active_streams() const { return impl_->active_; }
Rejections GenerationService::rejections() const {
  Rejections out{};
  for (size_t i = 0; i < out.size(); ++i) out[i] = impl_->rejected_[i];
  return out;
}
void GenerationService::set_log_prompts(bool on) { impl_->log_prompts_ = on; }

grpc::Status GenerationServiceImpl::Authorize(const grpc::CallbackServerContext* context) const {
  if (defaults_.api_keys.empty()) return grpc::Status::OK;
  const auto& metadata = context->client_metadata();
  const auto it = metadata.find("authorization");
  if (it != metadata.end()) {
    const std::string_view value(it->second.data(), it->second.size());
    constexpr std::string_view kBearer = "Bearer ";
    if (value.substr(0, kBearer.size()) == kBearer) {
      const std::string_view key = value.substr(kBearer.size());
      for (const std::string& k : defaults_.api_keys) {
        if (key == k) return grpc::Status::OK;
      }
    }
  }
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                      "a valid API key is required: authorization: Bearer <key>");
}

void GenerationServiceImpl::Register(const std::string& request_id, int64_t engine_id) {
  std::lock_guard<std::mutex> lock(mu_);
  ids_[request_id] = engine_id;
}

void GenerationServiceImpl::Forget(const std::string& request_id) {
  std::lock_guard<std::mutex> lock(mu_);
  ids_.erase(request_id);
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* GenerationServiceImpl::Generate(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* raw) {
  if (grpc::Status auth = Authorize(context); !auth.ok()) return Reject(context, "", auth);
  if (draining_) {
    return Reject(context, "",
                  grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is draining"));
  }
  v1::GenerateRequest request;
  if (grpc::Status s = ParseRequest(*raw, &request); !s.ok()) return Reject(context, "", s);
  // The id is checked before anything logs it.
  if (absl::Status id = CheckRequestId(request.request_id()); !id.ok()) {
    return Reject(context, "", ToGrpcStatus(id));
  }
  std::string request_id = request.request_id();
  auto built = BuildGenerationRequest(request, model_, defaults_);
  if (!built.ok()) return Reject(context, request_id, ToGrpcStatus(built.status()));
  // Claims the id (a generated one never collides with a client's) until the
  // stream ends; released at once if the engine refuses the request.
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (request_id.empty()) {
      do {
        request_id = StrCat("req-", next_request_id_++);
      } while (ids_.contains(request_id));
    } else if (ids_.contains(request_id)) {
      return Reject(context, request_id,
                    grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                                 "request_id: already in use by a request in flight"));
    }
    ids_[request_id] = -1;  // no engine id yet
  }
  const KvPolicyKind policy = built->kv.kind;
  const size_t prompt_tokens = built->prompt.size();
  auto submitted = engine_->Submit(*std::move(built));
  if (!submitted.ok()) {
    Forget(request_id);
    return Reject(context, request_id, ToGrpcStatus(submitted.status()));
  }
  Register(request_id, submitted->first);
  if (log_prompts_) {
    LogRequest(spdlog::level::info, request_id, "Generate prompt",
               {{"prompt_tokens", static_cast<int64_t>(prompt_tokens)},
                {"text", request.has_text() ? request.text() : request.DebugString()}});
  }
  return new GenerateReactor(this, submitted->first, std::move(request_id),
                             std::move(submitted->second), request.top_logprobs() > 0,
                             context->peer(), policy);
}

grpc::ServerUnaryReactor* GenerationServiceImpl::Cancel(grpc::CallbackServerContext* context,
                                                        const grpc::ByteBuffer* in,
                                                        grpc::ByteBuffer* out) {
  return RawUnary<v1::CancelRequest, v1::CancelResponse>(
      context, in, out, [&](const v1::CancelRequest& request, v1::CancelResponse* response) {
        int64_t engine_id = -1;
        {
          std::lock_guard<std::mutex> lock(mu_);
          if (const auto it = ids_.find(request.request_id()); it != ids_.end()) {
            engine_id = it->second;  // -1 while being submitted: not cancellable yet
          }
        }
        if (engine_id >= 0) {
          engine_->Cancel(engine_id);
          LogRequest(spdlog::level::info, request.request_id(), "cancelled by Cancel");
        }
        response->set_found(engine_id >= 0);
        return grpc::Status::OK;
      });
}

grpc::ServerUnaryReactor* GenerationServiceImpl::Tokenize(grpc::CallbackServerContext* context,
                                                          const grpc::ByteBuffer* in,
                                                          grpc::ByteBuffer* out) {
  return RawUnary<v1::TokenizeRequest, v1::TokenizeResponse>(
      context, in, out, [&](const v1::TokenizeRequest& request, v1::TokenizeResponse* response) {
        auto ids = TokenizeInput(model_, request);
        if (ids.ok()) {
          for (int32_t id : *ids) response->add_ids(id);
        }
        return ToGrpcStatus(ids.status());
      });
}

grpc::ServerUnaryReactor* GenerationServiceImpl::GetModelInfo(grpc::CallbackServerContext* context,
                                                              const v1::GetModelInfoRequest*,
                                                              v1::ModelInfo* response) {
  if (grpc::Status auth = Authorize(context); !auth.ok()) return Done(context, auth);
  const engine::ModelConfig& c = model_.config;
  response->set_architecture(c.architecture);
  response->set_name(model_.path);
  response->set_context_length(static_cast<uint32_t>(c.context_length));
  response->set_vocab_size(static_cast<uint32_t>(c.vocab_size));
  if (model_.tokenizer != nullptr) {
    if (auto t = engine::ChatTemplate::FromModel(*model_.tokenizer); t.ok()) {
      response->set_chat_template(std::string(t->family_name()));
    }
  }
  const KvPolicyConfig& kv = defaults_.kv;
  response->set_default_kv_policy(std::string(KvPolicyName(kv.kind)));
  v1::KvParams* d = response->mutable_default_kv();
  d->set_policy(std::string(KvPolicyName(kv.kind)));
  d->set_window(static_cast<uint32_t>(kv.window));
  d->set_capacity(static_cast<uint32_t>(kv.capacity));
  d->set_fusion(std::string(KvFusionName(kv.fusion)));
  d->set_sinks(static_cast<uint32_t>(kv.sinks));
  d->set_aggregation(std::string(MorphKvAggregationName(kv.aggregation)));
  response->set_max_new_tokens_limit(static_cast<uint32_t>(defaults_.max_new_tokens_limit));
  response->set_kv_block_size(static_cast<uint32_t>(engine_->options().block_size));
  return Done(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* GenerationServiceImpl::GetLoad(grpc::CallbackServerContext* context,
                                                         const v1::GetLoadRequest*,
                                                         v1::Load* response) {
  if (grpc::Status auth = Authorize(context); !auth.ok()) return Done(context, auth);
  const EngineStats s = engine_->Stats();
  response->set_running(static_cast<uint32_t>(s.running));
  response->set_waiting(static_cast<uint32_t>(s.waiting));
  response->set_kv_blocks_free(static_cast<uint32_t>(s.free_blocks));
  response->set_kv_blocks_total(static_cast<uint32_t>(s.total_blocks));
  // Default-policy requests with a 512-token prompt that the free blocks
  // could admit now.
  constexpr int64_t kPrompt = 512;
  const int64_t bs = engine_->options().block_size;
  const int64_t per_request =
      (defaults_.kv.MaxSlots(kPrompt, defaults_.max_new_tokens) + bs - 1) / bs;
  response->set_capacity_prompt_tokens(kPrompt);
  response->set_budget_capacity(
      static_cast<uint32_t>(per_request > 0 ? s.free_blocks / per_request : 0));
  return Done(context, grpc::Status::OK);
}

}  // namespace morphserve::server
